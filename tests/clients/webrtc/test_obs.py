"""The stream in a real OBS Studio: Debian's ``obs`` under Xvfb (Mesa's software GL), driven over
obs-websocket, plays ``/live.ts`` in a Media Source (the ffmpeg source every OBS build has).

OBS 29 (Debian 12's ``obs-studio``) ships obs-websocket 5.1, which reads its settings from the
``[OBSWebSocket]`` section of ``global.ini``; the test writes one into a temporary HOME, with a
free port and no password, so nothing of the user's OBS is touched. ``make obs-deps`` (part of
``make test``) installs ``obs-studio`` and ``xvfb``. Without them this test skips and says why,
except under CI (env CI set), where it fails.

With ``STREAMGEN_OBS_SCREENSHOT=PATH`` the test also saves the OBS window (the picture in
docs/obs-media-source.png was taken this way).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.clients.webrtc.harness import GatewayHarness
from tests.server.harness import ServerHarness

pytestmark = pytest.mark.obs

OBS = Path("/usr/bin/obs")
XVFB = Path("/usr/bin/Xvfb")
CANVAS = (320, 240)
SOURCE = "streamgen"
SCENE = "Scene"  # the scene OBS creates on its first start
GLOBAL_INI = """\
[General]
FirstRun=true
EnableAutoUpdates=false

[OBSWebSocket]
FirstLoad=false
ServerEnabled=true
ServerPort={port}
AlertsEnabled=false
AuthRequired=false
ServerPassword=
"""


def _why_not() -> str | None:
    missing = [str(p) for p in (OBS, XVFB) if not p.is_file()]
    if missing:
        return (f"{' and '.join(missing)} not found: install Debian's obs-studio and xvfb "
                f"(`make obs-deps` runs apt-get install as root)")
    try:
        import obsws_python  # noqa: F401
    except ImportError:
        return "obsws-python is not installed: pip install -e '.[dev]'"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ObsStudio:
    """Xvfb + OBS in a temporary HOME; ``client`` is an obs-websocket request client."""

    def __init__(self, home: Path) -> None:
        self.home = home
        port = _free_port()
        config = home / ".config" / "obs-studio"
        config.mkdir(parents=True)
        (config / "global.ini").write_text(GLOBAL_INI.format(port=port))
        read_fd, write_fd = os.pipe()
        # -displayfd: Xvfb picks a free display number and writes it to the pipe once it accepts clients.
        self.xvfb = subprocess.Popen([str(XVFB), "-displayfd", str(write_fd), "-screen", "0", "1080x720x24",
                                      "-nolisten", "tcp"], pass_fds=(write_fd,), stderr=subprocess.DEVNULL)
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            self.display = ":" + pipe.readline().strip()
        env = {**os.environ, "HOME": str(home), "DISPLAY": self.display, "LIBGL_ALWAYS_SOFTWARE": "1",
               "QT_QPA_PLATFORM": "xcb"}
        self.log_path = home / "obs.log"
        with self.log_path.open("wb") as log:
            self.obs = subprocess.Popen([str(OBS), "--multi", "--disable-updater", "--disable-missing-files-check"],
                                        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home)
        self.client = self._connect(port, timeout_s=60)

    def _connect(self, port: int, timeout_s: float) -> Any:
        import obsws_python

        deadline = time.monotonic() + timeout_s
        while True:
            if self.obs.poll() is not None:
                raise AssertionError(f"obs exited with {self.obs.returncode}: {self.log()}")
            try:
                return obsws_python.ReqClient(host="127.0.0.1", port=port, timeout=10)
            except (ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"obs-websocket not up on port {port} after {timeout_s} s: "
                                         f"{self.log()}") from None
                time.sleep(0.25)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def screenshot(self, source: str, width: int, height: int) -> np.ndarray:
        """GetSourceScreenshot of ``source`` as ``np.int16 [H, W, 3]``."""
        data = self.client.get_source_screenshot(source, "png", width, height, -1).image_data
        png = base64.b64decode(data.split(",", 1)[1])  # "data:image/png;base64,..."
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        _stop(self.obs)
        _stop(self.xvfb)


@pytest.fixture(scope="module")
def obs_studio() -> Iterator[ObsStudio]:
    reason = _why_not()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the OBS test must run in CI, but: {reason}")
        pytest.skip(reason)
    home = Path(tempfile.mkdtemp(prefix="streamgen-obs-"))
    studio = ObsStudio(home)
    try:
        yield studio
    finally:
        studio.close()
        shutil.rmtree(home, ignore_errors=True)


def test_obs_media_source_plays_live_ts(obs_studio: ObsStudio, server: ServerHarness,
                                        gateway: GatewayHarness) -> None:
    client = obs_studio.client
    assert client.get_version().obs_web_socket_version.startswith("5.")
    client.set_video_settings(16, 1, *CANVAS, *CANVAS)
    url = gateway.url + "/live.ts?" + urllib.parse.urlencode({"prompt": "a glossy red bottle turning", "seed": 5})
    settings = {"is_local_file": False, "input": url, "input_format": "mpegts", "hw_decode": False,
                "restart_on_activate": True, "close_when_inactive": True, "reconnect_delay_sec": 1}
    added_s = time.monotonic()
    client.create_input(SCENE, SOURCE, "ffmpeg_source", settings, True)
    try:
        item_id = client.get_scene_item_id(SCENE, SOURCE).scene_item_id
        client.set_scene_item_transform(SCENE, item_id, {
            "boundsType": "OBS_BOUNDS_SCALE_INNER", "boundsWidth": float(CANVAS[0]), "boundsHeight": float(CANVAS[1]),
            "positionX": 0.0, "positionY": 0.0})

        # Non-black video within a few seconds of adding the source ...
        deadline = added_s + 15
        first = obs_studio.screenshot(SOURCE, 64, 64)
        while first.mean() < 10 and time.monotonic() < deadline:
            time.sleep(0.2)
            first = obs_studio.screenshot(SOURCE, 64, 64)
        shown_s = time.monotonic() - added_s
        assert first.mean() >= 10, f"still black after {shown_s:.1f} s; obs log: {obs_studio.log()}"
        assert shown_s < 10
        # ... that moves: the source a second later differs.
        time.sleep(1.0)
        second = obs_studio.screenshot(SOURCE, 64, 64)
        assert second.mean() >= 10 and np.abs(first - second).mean() > 2.0
        assert server.metric("streamgen:num_streams_active") >= 1

        if path := os.environ.get("STREAMGEN_OBS_SCREENSHOT"):
            from PIL import ImageGrab

            ImageGrab.grab(xdisplay=obs_studio.display).save(path)
    finally:
        client.remove_input(SOURCE)
    # Removing the source closes its connection: the gateway cancels the stream, the server frees its pages.
    server.wait_metric("streamgen:kv_cache_used_bytes", lambda v: v == 0, timeout_s=10)
