"""Progress bars where people wait (dataset encoding, checkpoint saves and downloads), drawn by ``tqdm``.

``show`` is the client's ``progress`` setting: ``None`` draws bars only when standard error is a terminal
(tqdm's own rule) and tqdm is installed; ``True`` always draws them (tqdm required: the
``twinkle-client[progress]`` extra); ``False`` never does.
"""

from __future__ import annotations

from typing import Any


class _NoBar:
    """What the code updates when no bar is drawn."""

    n = 0
    total: int | None = None
    disable = True

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def reset(self, total: int | None = None) -> None:
        self.n, self.total = 0, total

    def close(self) -> None:
        pass


def progress_bar(show: bool | None, desc: str, *, total: int | None = None, unit: str = "it",
                 unit_scale: bool = False, bar_format: str | None = None) -> Any:
    if show is False:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        if show:
            raise ImportError("progress bars need tqdm: pip install 'twinkle-client[progress]'") from None
        return _NoBar()
    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, disable=None if show is None else False,
               bar_format=bar_format, leave=False, dynamic_ncols=True)
    return _NoBar() if bar.disable else bar
