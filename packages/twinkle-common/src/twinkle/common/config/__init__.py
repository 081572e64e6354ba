"""The typed, strict YAML config of a Twinkle server.

``load_config("server.yaml")`` gives a :class:`ServerConfig` or raises :class:`ConfigError` naming the file,
line and key path of the mistake; ``dump_config`` prints the normalized form (``print-config``).
"""

from twinkle.common.config._yaml import dump_config, load_config, load_config_text
from twinkle.common.config.errors import ConfigError
from twinkle.common.config.schema import (
    ARGS_BY_IMPORT_PATH,
    DEFAULT_DEPLOYMENT_NAMES,
    DEFAULT_SERVER_DEPLOYMENT_NAMES,
    AdapterConfig,
    AppArgs,
    Application,
    AutoscalingConfig,
    Deployment,
    DeviceGroup,
    DeviceMesh,
    HttpOptions,
    ModelArgs,
    ProcessorArgs,
    RayActorOptions,
    RuntimeEnv,
    SamplerArgs,
    ServerArgs,
    ServerConfig,
    default_deployment_name,
)

__all__ = [
    "ARGS_BY_IMPORT_PATH",
    "DEFAULT_DEPLOYMENT_NAMES",
    "DEFAULT_SERVER_DEPLOYMENT_NAMES",
    "AdapterConfig",
    "AppArgs",
    "Application",
    "AutoscalingConfig",
    "ConfigError",
    "Deployment",
    "DeviceGroup",
    "DeviceMesh",
    "HttpOptions",
    "ModelArgs",
    "ProcessorArgs",
    "RayActorOptions",
    "RuntimeEnv",
    "SamplerArgs",
    "ServerArgs",
    "ServerConfig",
    "default_deployment_name",
    "dump_config",
    "load_config",
    "load_config_text",
]
