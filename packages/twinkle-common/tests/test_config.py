"""The YAML config schema: the seed's examples load unchanged, and mistakes are reported by key path and line."""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path

import pytest

from twinkle.common.config import (
    ConfigError,
    Deployment,
    DeviceGroup,
    DeviceMesh,
    ModelArgs,
    ProcessorArgs,
    SamplerArgs,
    ServerArgs,
    ServerConfig,
    dump_config,
    load_config,
    load_config_text,
)

EXAMPLES = Path(__file__).resolve().parents[3] / "deploy" / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def _yaml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


# Line numbers below refer to this text; each mistake is one edit of it.
BASE = _yaml(
    """
    server_type: twinkle
    proxy_location: EveryNode
    http_options:
      host: 0.0.0.0
      port: 8000
    applications:
      - name: server
        route_prefix: /server
        import_path: server
        args:
      - name: model
        route_prefix: /models/tiny
        import_path: model
        args:
          use_megatron: false
          model_id: "ms://Qwen/Qwen2.5-0.5B-Instruct"
          nproc_per_node: 2
          device_group:
            name: model
            ranks: [0, 1]
            device_type: cuda
          device_mesh:
            device_type: cuda
            dp_size: 2
        deployments:
          - name: ModelManagement
            ray_actor_options:
              num_cpus: 0.1
              runtime_env:
                env_vars:
                  DEVICE_COUNT_PER_PHYSICAL_NODE: "8"
      - name: processor
        route_prefix: /processors
        import_path: processor
        args:
          ncpu_proc_per_node: 2
          device_group:
            name: processor
            ranks: 2
            device_type: CPU
          device_mesh:
            device_type: CPU
            dp_size: 2
    """
)


def _load_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, source="server.yaml")
    return caught.value


# --------------------------------------------------------------------------------------- examples load


def test_the_four_seed_examples_are_in_deploy_examples():
    assert [path.name for path in EXAMPLE_FILES] == [
        "ranks.yaml",
        "tinker.yaml",
        "twinkle-megatron.yaml",
        "twinkle-transformers.yaml",
    ]


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda path: path.name)
def test_every_example_loads(path: Path):
    cfg = load_config(path)
    assert cfg.applications


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda path: path.name)
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_dump_config_round_trips(path: Path, fmt: str):
    cfg = load_config(path)
    dumped = dump_config(cfg, fmt)
    assert load_config_text(dumped, source=f"dumped.{fmt}") == cfg
    assert dump_config(load_config_text(dumped), fmt) == dumped


def test_base_of_the_mistake_table_loads():
    load_config_text(BASE).check_deployable()


def test_transformers_example_values():
    cfg = load_config(EXAMPLES / "twinkle-transformers.yaml")
    assert (cfg.server_type, cfg.proxy_location, cfg.ingress) == ("twinkle", "EveryNode", "serve")
    assert (cfg.http_options.host, cfg.http_options.port) == ("0.0.0.0", 8000)
    server, model, processor = cfg.applications
    assert isinstance(server.args, ServerArgs)
    assert server.deployment.name == "TwinkleServer"
    assert server.deployment.autoscaling_config.target_ongoing_requests == 128
    assert isinstance(model.args, ModelArgs)
    assert model.args.backend == "transformers" and model.args.use_megatron is None
    assert model.args.require_model_id() == "ms://Qwen/Qwen2.5-7B-Instruct"
    assert (model.args.adapter_config.per_token_adapter_limit, model.args.adapter_config.adapter_timeout) == (30, 1800)
    assert model.args.device_group.ranks == [0, 1]
    assert model.args.device_mesh.world_size == 2
    assert isinstance(processor.args, ProcessorArgs)
    group = processor.args.device_group
    assert (group.device_type, group.ranks, group.cpu_ranks_hint) == ("cpu", [0, 1], 2)
    assert processor.args.device_mesh.device_type == "cpu"
    cfg.check_deployable()


def test_megatron_example_selects_the_megatron_backend():
    model = load_config(EXAMPLES / "twinkle-megatron.yaml").applications[1]
    assert model.args.backend == "megatron"


def test_tinker_example_values():
    cfg = load_config(EXAMPLES / "tinker.yaml")
    assert cfg.server_type == "tinker"
    sampler = cfg.applications[2]
    assert isinstance(sampler.args, SamplerArgs)
    assert sampler.args.sampler_type == "vllm"
    assert sampler.args.engine_args == {"max_model_len": 4096, "gpu_memory_utilization": 0.5, "enable_lora": True}
    env = sampler.deployment.ray_actor_options.runtime_env.env_vars
    assert env == {"DEVICE_COUNT_PER_PHYSICAL_NODE": "8"}
    cfg.check_deployable()


def test_ranks_example_has_no_server_and_no_model_id_so_it_loads_but_is_not_deployable():
    cfg = load_config(EXAMPLES / "ranks.yaml")
    model, sampler, processor = cfg.applications
    assert model.args.device_group.ranks == [0, 1, 2, 3]
    assert sampler.args.device_group.ranks == [4, 5]
    assert processor.args.device_group.ranks == [0, 1, 2, 3]  # 4 CPU workers from dp_size, though "ranks: 0"
    assert processor.args.device_group.cpu_ranks_hint == 0
    with pytest.raises(ConfigError) as caught:
        cfg.check_deployable()
    assert [error.path for error in caught.value.errors] == [
        "applications",
        "applications[0].args.model_id",
        "applications[1].args.model_id",
    ]
    with pytest.raises(ConfigError, match="model_id: is required"):
        model.args.require_model_id()


# ------------------------------------------------------------------------------------ seed snippets

SEED_MEGATRON_APP = """
  # Model 服务 — Megatron 后端
  - name: models-Qwen2.5-7B-Instruct
    route_prefix: /models/Qwen/Qwen2.5-7B-Instruct
    import_path: model
    args:
      use_megatron: true                               # 使用 Megatron-LM 后端
      model_id: "ms://Qwen/Qwen2.5-7B-Instruct"
      nproc_per_node: 2
      device_group:
        name: model
        ranks: [0, 1]
        device_type: cuda
      device_mesh:
        device_type: cuda
        dp_size: 2                    # 数据并行大小
"""

SEED_GROUP_AND_MESH = """
device_group:
  name: model          # 设备组名称
  ranks: [0, 1]        # 物理 GPU 卡号列表
  device_type: cuda     # 设备类型：cuda / CPU

device_mesh:
  device_type: cuda
  dp_size: 2           # 数据并行大小
  # tp_size: 1         # 张量并行大小（可选）
  # pp_size: 1         # 流水线并行大小（可选）
  # ep_size: 1         # 专家并行大小（可选）
"""


def test_seed_megatron_snippet_loads_as_an_application():
    cfg = load_config_text("applications:\n" + SEED_MEGATRON_APP)
    (model,) = cfg.applications
    assert model.args.backend == "megatron"
    assert model.deployment.name == "ModelManagement"  # deployments omitted: one default deployment


def test_seed_group_and_mesh_snippet_loads_as_model_args():
    args = textwrap.indent(SEED_GROUP_AND_MESH, "      ")
    text = "applications:\n  - name: m\n    route_prefix: /m\n    import_path: model\n    args:\n" + args
    model = load_config_text(text).applications[0]
    assert model.args.device_group == DeviceGroup(name="model", ranks=[0, 1], device_type="cuda")
    assert model.args.device_mesh == DeviceMesh(device_type="cuda", dp_size=2)


@pytest.mark.parametrize(
    ("spelling", "ranks", "expected"),
    [
        ("cuda", "2", [0, 1]),  # upstream's later spelling: an int is a GPU count
        ("GPU", "[4, 5]", [4, 5]),
        ("NPU", "[6, 7]", [6, 7]),
    ],
)
def test_gpu_ranks_and_device_type_spellings(spelling: str, ranks: str, expected: list[int]):
    text = BASE.replace("ranks: [0, 1]", f"ranks: {ranks}").replace(
        "        device_type: cuda\n      device_mesh:\n        device_type: cuda",
        f"        device_type: {spelling}\n      device_mesh:\n        device_type: {spelling.lower()}",
    )
    group = load_config_text(text).applications[1].args.device_group
    assert group.ranks == expected
    assert group.device_type == {"gpu": "cuda"}.get(spelling.lower(), spelling.lower())


def test_mesh_is_derived_from_the_group_when_left_out():
    args = ModelArgs(device_group=DeviceGroup(name="g", ranks=[2, 3], device_type="cuda"), nproc_per_node=2)
    assert args.device_mesh == DeviceMesh(device_type="cuda", dp_size=2)


def test_mesh_device_type_defaults_to_the_group_one():
    group = DeviceGroup(name="g", ranks=3, device_type="cpu")
    args = ProcessorArgs(device_group=group, device_mesh=DeviceMesh(dp_size=3))
    assert args.device_mesh.device_type == "cpu"
    assert args.device_group.ranks == [0, 1, 2]


def test_cpu_processor_without_mesh_takes_its_worker_count_from_ncpu_proc_per_node():
    args = ProcessorArgs(ncpu_proc_per_node=3, device_group=DeviceGroup(name="p", ranks=0, device_type="CPU"))
    assert args.device_group.ranks == [0, 1, 2]
    assert args.device_mesh.world_size == 3


def test_world_size_counts_every_parallel_axis_but_ep():
    mesh = DeviceMesh(dp_size=2, tp_size=2, pp_size=2, cp_size=1, ep_size=4)
    assert mesh.world_size == 8


def test_empty_args_and_omitted_deployments_mean_defaults():
    cfg = load_config_text("applications:\n  - name: s\n    route_prefix: /s\n    import_path: sampler\n    args: {}\n")
    sampler = cfg.applications[0]
    assert sampler.args == SamplerArgs()
    assert (sampler.args.sampler_type, sampler.args.max_loras) == ("torch", 8)
    assert sampler.deployment == Deployment(name="SamplerManagement")
    assert sampler.deployment.serve_options() == {}


@pytest.mark.parametrize(("server_type", "name"), [("twinkle", "TwinkleServer"), ("tinker", "TinkerCompatServer")])
def test_omitted_server_deployment_is_named_after_the_protocol(server_type: str, name: str):
    text = f"server_type: {server_type}\napplications:\n  - name: s\n    route_prefix: /api/v1\n    import_path: server\n"
    (server,) = load_config_text(text).applications
    assert server.deployments == [Deployment(name=name)]


def test_defaults_of_an_almost_empty_config():
    cfg = load_config_text("applications: []\n")
    assert cfg == ServerConfig()
    assert (cfg.server_type, cfg.serve_proxy_location, cfg.http_options.host, cfg.http_options.port) == (
        "twinkle",
        "EveryNode",
        "127.0.0.1",
        8000,
    )
    assert (cfg.ray_namespace, cfg.checkpoint_dir, cfg.state_db) == (None, None, None)


def test_ingress_gateway_turns_serves_proxy_off_and_refuses_what_it_cannot_honour():
    tinker = "server_type: tinker\ningress: gateway\napplications: []\n"
    cfg = load_config_text(tinker)
    assert (cfg.ingress, cfg.proxy_location, cfg.serve_proxy_location) == ("gateway", None, "Disabled")
    assert load_config_text(tinker + "proxy_location: Disabled\n").serve_proxy_location == "Disabled"
    assert load_config_text("applications: []\nproxy_location: HeadOnly\n").serve_proxy_location == "HeadOnly"
    with pytest.raises(ConfigError) as caught:
        load_config_text(tinker + "proxy_location: HeadOnly\n")
    assert caught.value.path == "proxy_location" and "Serve's proxy is not started" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_config_text("ingress: gateway\napplications: []\n")  # server_type twinkle
    assert caught.value.path == "ingress" and "server_type: tinker" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_config_text(tinker).with_server_type("twinkle")
    assert caught.value.path == "ingress"
    with pytest.raises(ConfigError) as caught:
        load_config_text("ingress: proxy\napplications: []\n")
    assert caught.value.path == "ingress"


def test_server_args_defaults():
    args = ServerArgs()
    assert (args.api_keys, args.supported_models, args.long_poll_timeout_s) == ([], None, 25.0)


# ------------------------------------------------------------------------------------ the mistake table

MISTAKES = [
    # id, text to replace in BASE (first occurrence), replacement, path, line, message fragment
    ("unknown_top_level_key", "proxy_location: EveryNode\n", "proxy_location: EveryNode\nlisten: 8000\n",
     "listen", 3, 'unknown key "listen"; allowed here: server_type'),
    ("typo_in_args_key", "    dp_size: 2\n", "    dp_szie: 2\n",
     "applications[1].args.device_mesh.dp_szie", 24, 'did you mean "dp_size"?'),
    ("wrong_type", "    dp_size: 2\n", "    dp_size: two\n",
     "applications[1].args.device_mesh.dp_size", 24, 'expected int, got str "two"'),
    ("negative_dp_size", "    dp_size: 2\n", "    dp_size: -2\n",
     "applications[1].args.device_mesh.dp_size", 24, "expected int >= 1, got int -2"),
    ("bad_import_path", "import_path: model", "import_path: trainer",
     "applications[1].import_path", 13, 'must be one of server, model, sampler, processor, got "trainer"'),
    ("import_path_typo_suggests", "import_path: model", "import_path: modle",
     "applications[1].import_path", 13, 'did you mean "model"?'),
    ("duplicate_route_prefix", "route_prefix: /processors", "route_prefix: /server",
     "applications[2].route_prefix", 33, '"/server" is already used by applications[0]'),
    ("duplicate_application_name", "- name: processor", "- name: model",
     "applications[2].name", 32, '"model" is already the name of applications[1]'),
    ("mesh_product_differs_from_ranks", "ranks: [0, 1]", "ranks: [0, 1, 2, 3]",
     "applications[1].args.device_mesh", 22, "the mesh has 2 workers (dp_size 2) but device_group 'model' has 4 ranks"),
    ("processor_in_tinker_mode", "server_type: twinkle", "server_type: tinker",
     "applications[2].import_path", 34, "processor applications are served only with server_type twinkle"),
    ("bad_device_type", "device_type: cuda", "device_type: tpu",
     "applications[1].args.device_group.device_type", 21, 'must be one of cuda, cpu, npu (any case; "gpu" means cuda), got "tpu"'),
    ("yaml_syntax_error", "  host: 0.0.0.0", "  host: 0.0.0.0: oops",
     "", 4, "invalid YAML: mapping values are not allowed here"),
    ("duplicate_key", "  port: 8000\n", "  port: 8000\n  port: 8001\n",
     "http_options.port", 6, "duplicate key (first given on line 5)"),
    ("route_prefix_without_slash", "route_prefix: /processors", "route_prefix: processors",
     "applications[2].route_prefix", 33, 'must start with "/", got "processors"'),
    ("route_prefix_with_trailing_slash", "route_prefix: /processors", "route_prefix: /processors/",
     "applications[2].route_prefix", 33, 'must not end with "/"'),
    ("use_megatron_contradicts_backend", "use_megatron: false\n", "use_megatron: false\n      backend: megatron\n",
     "applications[1].args.use_megatron", 15, "false contradicts backend: megatron; give only one of them"),
    ("bad_proxy_location", "proxy_location: EveryNode", "proxy_location: everywhere",
     "proxy_location", 2, 'must be one of Disabled, EveryNode, HeadOnly, got "everywhere"'),
    ("env_var_value_not_a_string", 'NODE: "8"', "NODE: 8",
     "applications[1].deployments[0].ray_actor_options.runtime_env.env_vars.DEVICE_COUNT_PER_PHYSICAL_NODE", 31,
     'expected str, got int 8 (environment variables are strings: quote it, "8")'),
    ("nproc_per_node_does_not_divide_ranks", "nproc_per_node: 2", "nproc_per_node: 4",
     "applications[1].args.nproc_per_node", 17, "4 does not divide the 2 ranks of device_group 'model'"),
    ("missing_application_name", "  - name: processor\n    route_prefix", "  - route_prefix",
     "applications[2].name", 32, "is required"),
    ("args_not_a_mapping", "    args:\n  - name: model", "    args: please\n  - name: model",
     "applications[0].args", 10, 'expected mapping or null, got str "please"'),
    ("key_of_another_kind_of_args", "use_megatron: false\n", "use_megatron: false\n      ncpu_proc_per_node: 2\n",
     "applications[1].args.ncpu_proc_per_node", 16, 'unknown key "ncpu_proc_per_node"'),
    ("typo_in_ray_actor_options", "num_cpus: 0.1", "num_cpu: 0.1",
     "applications[1].deployments[0].ray_actor_options.num_cpu", 28, 'did you mean "num_cpus"?'),
    ("ep_size_does_not_divide", "    dp_size: 2\n", "    dp_size: 2\n        ep_size: 3\n",
     "applications[1].args.device_mesh.ep_size", 25, "3 does not divide dp_size * tp_size * cp_size = 2"),
    ("gpu_rank_listed_twice", "ranks: [0, 1]", "ranks: [0, 0]",
     "applications[1].args.device_group.ranks[1]", 20, "rank 0 is listed twice"),
    ("mesh_and_group_device_types_differ", "        device_type: cuda\n        dp_size", "        device_type: cpu\n        dp_size",
     "applications[1].args.device_mesh.device_type", 23, "is cpu but device_group.device_type is cuda"),
    ("port_is_a_bool", "port: 8000", "port: yes",
     "http_options.port", 5, "expected int, got bool true"),
    ("import_path_given_inside_args", "    args:\n  - name: model", "    args:\n      import_path: server\n  - name: model",
     "applications[0].args.import_path", 11, "import_path belongs to the application"),
]


@pytest.mark.parametrize(("case", "old", "new", "path", "line", "fragment"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistake_is_reported_by_path_and_line(case, old, new, path, line, fragment):
    assert old in BASE, f"{case}: the edit no longer applies to BASE"
    error = _load_error(BASE.replace(old, new, 1))
    assert (error.path, error.line, error.source) == (path, line, "server.yaml")
    assert fragment in error.message
    location = f"server.yaml:{line}: {path}: " if path else f"server.yaml:{line}: "
    assert str(error).startswith(location + error.message)


def test_error_string_matches_the_documented_format():
    error = _load_error(BASE.replace("    dp_size: 2\n", "    dp_size: two\n", 1))
    assert str(error) == 'server.yaml:24: applications[1].args.device_mesh.dp_size: expected int, got str "two"'


def test_several_mistakes_are_all_reported_in_file_order():
    text = BASE.replace("  port: 8000", "  prot: 8000").replace("    dp_size: 2\n", "    dp_szie: 2\n", 1)
    error = _load_error(text)
    assert [(problem.path, problem.line) for problem in error.errors] == [
        ("http_options.prot", 5),
        ("applications[1].args.device_mesh.dp_szie", 24),
    ]
    assert str(error).splitlines()[1].startswith("server.yaml:24: applications[1].args.device_mesh.dp_szie")


def test_cross_application_mistakes_are_collected():
    text = BASE.replace("- name: processor", "- name: model").replace("route_prefix: /processors", "route_prefix: /server")
    error = _load_error(text)
    assert [problem.path for problem in error.errors] == ["applications[2].name", "applications[2].route_prefix"]


def test_second_server_application_is_rejected():
    text = BASE + "  - name: server2\n    route_prefix: /server2\n    import_path: server\n"
    error = _load_error(text)
    assert (error.path, error.line) == ("applications[3].import_path", 46)
    assert "a second server application" in error.message


def test_vllm_refuses_cpu_and_megatron_is_checked_where_it_runs():
    """vLLM cannot sample on a CPU group: a config error. megatron-core 0.16 needs CUDA for a few calls, which
    a CPU process may provide (the test suite's shim does): its workers check at start-up and fail naming why."""
    text = _yaml(
        """
        applications:
          - name: s
            route_prefix: /s
            import_path: sampler
            args:
              sampler_type: vllm
              device_group: {name: s, ranks: 1, device_type: cpu}
          - name: m
            route_prefix: /m
            import_path: model
            args: {backend: megatron, device_group: {name: m, ranks: [0], device_type: cpu}}
        """
    )
    error = _load_error(text)
    assert [(problem.path, problem.line) for problem in error.errors] == [("applications[0].args.sampler_type", 6)]
    loaded = load_config_text(text.replace("sampler_type: vllm", "sampler_type: torch"))
    assert loaded.applications[1].args.backend == "megatron"


def test_fixed_replicas_and_autoscaling_exclude_each_other():
    text = BASE.replace("      - name: ModelManagement\n", "      - name: ModelManagement\n        num_replicas: 2\n        autoscaling_config: {max_replicas: 2}\n")
    error = _load_error(text)
    assert (error.path, error.line) == ("applications[1].deployments[0].num_replicas", 27)


def test_autoscaling_bounds_are_checked():
    text = BASE.replace("      - name: ModelManagement\n", "      - name: ModelManagement\n        autoscaling_config: {min_replicas: 3, max_replicas: 2}\n")
    error = _load_error(text)
    assert (error.path, error.line) == ("applications[1].deployments[0].autoscaling_config.min_replicas", 27)


def test_long_poll_must_end_before_the_tinker_sdk_read_timeout():
    error = _load_error(BASE.replace("    args:\n  - name: model", "    args: {long_poll_timeout_s: 60}\n  - name: model"))
    assert (error.path, error.line) == ("applications[0].args.long_poll_timeout_s", 10)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "the config is empty"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("applications: {}\n", "expected list, got mapping"),
        ("a: &x [*x]\n", "recursive YAML"),
        ("--- {}\n--- {}\n", "invalid YAML"),
        ("x: !!python/object:os.system ls\n", "invalid YAML"),
        ("\tserver_type: twinkle\n", "invalid YAML"),
        ("? [a, b]\n: 1\n", "mapping keys must be plain scalars"),
        ("applications:\n- name: a\n  route_prefix: /a\n  import_path: model\n  deployments: [{name: d, ray_actor_options: {runtime_env: {env_vars: {1: x}}}}]\n",
         "keys here must be strings, got int 1"),
        ("applications:\n- name: a\n  route_prefix: /a\n  import_path: model\n  deployments: [{name: d, ray_actor_options: {resources: {ok: 1, bad: -1}}}]\n",
         "expected float >= 0.0, got int -1"),
    ],
)
def test_odd_inputs_raise_config_error_not_a_traceback(text: str, fragment: str):
    error = _load_error(text)
    assert fragment in error.message


def test_dict_value_errors_name_the_offending_key():
    text = "applications:\n- name: a\n  route_prefix: /a\n  import_path: model\n  deployments: [{name: d, ray_actor_options: {resources: {ok: 1, bad: -1}}}]\n"
    assert _load_error(text).path == "applications[0].deployments[0].ray_actor_options.resources.bad"


def test_missing_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_merge_keys_are_supported():
    text = _yaml(
        """
        applications:
          - name: a
            route_prefix: /a
            import_path: model
            args: &placement
              device_group: {name: g, ranks: [0, 1], device_type: cuda}
              device_mesh: {dp_size: 2}
          - name: b
            route_prefix: /b
            import_path: sampler
            args:
              <<: *placement
              sampler_type: vllm
        """
    )
    sampler = load_config_text(text).applications[1]
    assert sampler.args.device_group.ranks == [0, 1] and sampler.args.sampler_type == "vllm"


# ------------------------------------------------------------------------------- normalization and API


def test_dump_is_normalized():
    text = BASE.replace("ranks: [0, 1]", "ranks: 2").replace("device_type: cuda", "device_type: GPU", 1)
    dumped = dump_config(load_config_text(text), "yaml")
    assert "ranks: [0, 1]" in dumped
    assert "device_type: cuda" in dumped and "GPU" not in dumped and "CPU" not in dumped
    assert "use_megatron" not in dumped and "backend: transformers" in dumped
    assert "ranks: [0, 1]\n      device_type: cpu\n      cpu_ranks_hint: 2" in dumped
    assert "import_path: server\n  args:\n    api_keys: []" in dumped  # args tag not repeated inside args
    assert "DEVICE_COUNT_PER_PHYSICAL_NODE: '8'" in dumped


def test_dump_rejects_unknown_formats():
    with pytest.raises(ValueError):
        dump_config(ServerConfig(), "toml")  # type: ignore[arg-type]


def test_with_server_type_rechecks_the_config():
    cfg = load_config_text(BASE)
    with pytest.raises(ConfigError, match=r"applications\[2\].import_path: processor applications"):
        cfg.with_server_type("tinker")
    tinker = load_config(EXAMPLES / "tinker.yaml")
    assert tinker.with_server_type("twinkle").server_type == "twinkle"
    assert tinker.server_type == "tinker"  # configs are immutable
    with pytest.raises(ConfigError):
        cfg.with_server_type("grpc")  # type: ignore[arg-type]


def test_serve_options_are_ray_serve_keywords_without_name():
    cfg = load_config(EXAMPLES / "tinker.yaml")
    assert cfg.applications[2].deployment.serve_options() == {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16},
        "ray_actor_options": {
            "num_cpus": 0.1,
            "num_gpus": 1,
            "runtime_env": {"env_vars": {"DEVICE_COUNT_PER_PHYSICAL_NODE": "8"}},
        },
    }
    assert cfg.http_options.serve_options() == {"host": "0.0.0.0", "port": 8000, "root_path": ""}


def test_structs_built_in_python_are_checked_too():
    with pytest.raises(ConfigError, match="ranks: a count of cuda devices must be at least 1"):
        DeviceGroup(name="g", ranks=0)
    with pytest.raises(ConfigError, match="ep_size: 3 does not divide"):
        DeviceMesh(dp_size=4, ep_size=3)
    with pytest.raises(ConfigError, match="cpu_ranks_hint: only applies to device_type cpu"):
        DeviceGroup(name="g", ranks=[0], cpu_ranks_hint=1)


def test_config_error_survives_pickling():
    error = _load_error(BASE.replace("    dp_size: 2\n", "    dp_size: two\n", 1))
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.line, copy.source, str(copy)) == (error.path, error.line, error.source, str(error))
    assert isinstance(copy, ConfigError)


def test_log_format_is_text_json_or_refused():
    assert load_config_text(BASE).log_format == "text"
    assert load_config_text("log_format: json\n" + BASE).log_format == "json"
    err = _load_error("log_format: xml\n" + BASE)
    assert "log_format" in str(err)
