"""The WebRTC page in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
it negotiates with the gateway on 127.0.0.1, plays, changes the prompt on the server, frees the
server session when its tab closes; the OBS view; a server that is down.

Chromium comes from `make browser-deps` (part of `make test`). Without it these tests skip and
say why, except under CI (env CI set), where they fail: CI must not go green without them.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from PIL import Image

from clients.webrtc.ice import IceServer
from tests.clients.webrtc.harness import FPS, GatewayHarness, PromptSpy, wait_idle
from tests.server.harness import ServerHarness, make_engine

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync", "--disable-quic", "--window-size=900,900",
    "--autoplay-policy=no-user-gesture-required", "--use-fake-ui-for-media-stream",
    # ICE on 127.0.0.1 (the gateway offers nothing else here), with plain addresses in the candidates
    # instead of mDNS names: nothing to resolve by multicast.
    "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
)
T = TypeVar("T")


def _why_not() -> str | None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        return (f"{' and '.join(missing)} not found: install Debian's chromium and chromium-driver "
                f"(`make browser-deps` runs apt-get install as root)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[dev]'"
    return None


@contextlib.contextmanager
def chromium() -> Iterator[tuple[Any, str]]:
    """A headless Chromium driven by chromedriver, in a fresh profile: (driver, profile directory)."""
    reason = _why_not()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the browser tests must run in CI, but: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium must not phone home (not used with paths given)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.TemporaryDirectory(prefix="streamgen-chromium-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile.name}"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield chrome, profile.name
    finally:
        with contextlib.suppress(Exception):
            chrome.quit()
        profile.cleanup()


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    with chromium() as (chrome, _):
        yield chrome


def wait_until(what: str, probe: Callable[[], T], timeout_s: float = 20.0) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {value!r} after {timeout_s} s")
        time.sleep(0.1)


def page_state(chrome: Any) -> dict[str, Any]:
    return chrome.execute_script("""
        const v = document.getElementById("video"), s = document.getElementById("status");
        return {state: window.streamgen.state, session: window.streamgen.sessionId, status: s.textContent,
                statusError: s.classList.contains("error"), time: v.currentTime, paused: v.paused,
                ready: v.readyState, width: v.videoWidth, height: v.videoHeight};""")


def video_pixels(chrome: Any) -> np.ndarray:
    from selenium.webdriver.common.by import By

    png = chrome.find_element(By.ID, "video").screenshot_as_png
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def open_tab(chrome: Any, url: str) -> str:
    chrome.switch_to.new_window("tab")
    chrome.get(url)
    return chrome.current_window_handle


def close_tab(chrome: Any) -> None:
    chrome.close()
    chrome.switch_to.window(chrome.window_handles[0])


def wait_playing(chrome: Any) -> dict[str, Any]:
    return wait_until("the video plays", lambda: (lambda s: s if s["state"] == "playing" and s["time"] > 0.3
                                                   and not s["paused"] else None)(page_state(chrome)))


def test_page_plays_changes_the_prompt_and_frees_the_session_when_closed(
        driver: Any, server: ServerHarness, gateway: GatewayHarness, spy: PromptSpy) -> None:
    from selenium.webdriver.common.by import By

    open_tab(driver, gateway.url + "/?prompt=a%20glossy%20red%20bottle%20turning")
    driver.find_element(By.ID, "toggle").click()
    state = wait_playing(driver)
    assert (state["width"], state["height"]) == (32, 32) and state["ready"] >= 2
    assert spy.wait_for("starts", "a glossy red bottle turning") == state["session"]
    assert server.metric("streamgen:num_sessions_running") == 1

    # The picture moves: two screenshots of the video a second apart differ.
    first = video_pixels(driver)
    time.sleep(1.0)
    second = video_pixels(driver)
    assert first.shape == second.shape and first.shape[0] > 100
    assert np.abs(first - second).mean() > 1.0
    stats = wait_until("live stats", lambda: (t if "fps 1" in (t := driver.find_element(By.ID, "stats").text)
                                              else None))
    assert "latency" in stats and "first frame" in stats

    # A prompt change typed on the page reaches the server's session over the data channel.
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys("a matte blue mug on a wooden table")
    driver.find_element(By.ID, "send").click()
    assert spy.wait_for("updates", "a matte blue mug on a wooden table") == state["session"]
    wait_until("the page confirms", lambda: "prompt sent" in page_state(driver)["status"])

    # An unknown message: an error on the page, the video goes on.
    assert driver.execute_script('return window.streamgen.send({type: "dance"})') is True
    wait_until("the error shows", lambda: (lambda s: s["statusError"] and "unknown message type 'dance'"
                                           in s["status"])(page_state(driver)))
    played = page_state(driver)["time"]
    wait_until("still playing", lambda: page_state(driver)["time"] > played + 0.5)

    # Stop ends the stream (the server's session with it); Start begins a new one.
    driver.find_element(By.ID, "toggle").click()
    wait_until("stopped", lambda: "stream ended: stopped" in page_state(driver)["status"])
    wait_idle(server, gateway)
    driver.find_element(By.ID, "toggle").click()
    assert wait_playing(driver)["session"] != state["session"]

    # Closing the tab ends the server's session and frees its KV pages.
    close_tab(driver)
    assert wait_idle(server, gateway) < 5.0


def test_obs_view_starts_by_itself_full_frame_without_controls(
        driver: Any, server: ServerHarness, gateway: GatewayHarness, spy: PromptSpy) -> None:
    open_tab(driver, gateway.url + "/?obs=1&prompt=a%20white%20sneaker%20on%20a%20turntable&seed=4")
    state = wait_playing(driver)  # nobody clicked anything
    assert spy.wait_for("starts", "a white sneaker on a turntable") == state["session"]
    layout = driver.execute_script("""
        const v = document.getElementById("video"), r = v.getBoundingClientRect();
        const shown = (id) => getComputedStyle(document.getElementById(id)).display !== "none";
        return {controls: v.controls, form: shown("controls"), stats: shown("stats"), status: shown("status"),
                rect: [r.left, r.top, r.width, r.height], viewport: [innerWidth, innerHeight],
                background: getComputedStyle(document.body).backgroundColor};""")
    assert layout["controls"] is False and not layout["form"] and not layout["stats"] and not layout["status"]
    assert layout["rect"] == [0, 0, *layout["viewport"]]
    assert layout["background"] == "rgb(0, 0, 0)"
    close_tab(driver)
    wait_idle(server, gateway)


def test_page_says_when_the_server_is_down(driver: Any) -> None:
    from selenium.webdriver.common.by import By

    down = GatewayHarness("127.0.0.1:1")
    try:
        open_tab(driver, down.url + "/")
        driver.find_element(By.ID, "toggle").click()
        state = wait_until("the error shows", lambda: (lambda s: s if s["statusError"] else None)(page_state(driver)))
        assert "the streamgen server at 127.0.0.1:1 is unreachable" in state["status"]
        assert state["state"] == "idle" and down.num_viewers() == 0
        close_tab(driver)
    finally:
        down.close()


@pytest.fixture(scope="module")
def serve_default_server() -> Iterator[ServerHarness]:
    """Paced like `streamgen serve` by default: generation may run 2 s ahead of playback (the lead a
    gateway that plays every frame on its own clock turns into 2 s of delay)."""
    with ServerHarness(make_engine(max_lead_s=2.0, unbounded_max_frames=60 * FPS)) as harness:
        yield harness


def test_gateway_adds_at_most_300_ms_p50_measured_per_frame_in_the_browser(
        driver: Any, serve_default_server: ServerHarness) -> None:
    """Per frame: ready at the gateway (its chunk's arrival from gRPC + its place in the chunk at the
    stream's fps) -> received by the browser (requestVideoFrameCallback's receiveTime), matched by
    RTP timestamp; both clocks are this machine's."""
    from selenium.webdriver.common.by import By

    gateway = GatewayHarness(serve_default_server.address)
    try:
        open_tab(driver, gateway.url + "/?prompt=a%20glossy%20red%20bottle%20turning")
        driver.find_element(By.ID, "toggle").click()
        wait_playing(driver)
        time.sleep(4.0)
        latency = driver.execute_script("return window.streamgen.latency")
        stats = driver.find_element(By.ID, "stats").text
        gateway_ms = np.array([entry["gatewayMs"] for entry in latency])
        pacing_ms = np.array([entry["pacingMs"] for entry in latency])
        jitter_ms = np.array([entry["jitterMs"] for entry in latency])
        print(f"gateway-added latency over {len(latency)} frames: p50 {np.median(gateway_ms):.0f} ms "
              f"(pacing {np.median(pacing_ms):.0f}), p90 {np.percentile(gateway_ms, 90):.0f} ms; "
              f"jitter buffer p50 {np.median(jitter_ms):.0f} ms; stats line: {stats}")
        assert len(latency) >= 2 * FPS                         # most frames of 4 s were matched
        assert np.median(gateway_ms) <= 300
        assert "gateway" in stats and "pacing" in stats and "jitter buffer" in stats and "skipped" in stats

        # One frame count: the page's stats line, /status and the gateway's log agree once it stops.
        driver.find_element(By.ID, "toggle").click()
        wait_until("stopped", lambda: "stream ended: stopped" in page_state(driver)["status"])
        ended = driver.execute_script(
            'return window.streamgen.messages.filter((m) => m.type === "ended").pop()')
        assert f"frames {ended['frames']}" in driver.find_element(By.ID, "stats").text
        assert ended["frames"] + 0 >= 4 * FPS and ended["generated"] >= ended["frames"]
        close_tab(driver)
        wait_idle(serve_default_server, gateway)
    finally:
        gateway.close()


def test_a_killed_browser_has_its_stream_cancelled_within_5_s(server: ServerHarness,
                                                                gateway: GatewayHarness) -> None:
    with chromium() as (chrome, profile):
        open_tab(chrome, gateway.url + "/?obs=1&prompt=a%20red%20mug")
        wait_playing(chrome)
        assert server.metric("streamgen:num_sessions_running") == 1
        # SIGKILL every process of that browser (found by its profile directory): no tab close, no
        # pagehide, no DTLS close; the gateway only stops hearing from it.
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, profile)]
        assert pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed_s = time.monotonic()
        server.wait_metric("streamgen:num_sessions_running", lambda v: v == 0, timeout_s=5.0)
        server.wait_metric("streamgen:kv_cache_used_bytes", lambda v: v == 0, timeout_s=1.0)
        took_s = time.monotonic() - killed_s
        print(f"killed browser: stream cancelled after {took_s:.2f} s")
        assert took_s < 5.0
    wait_idle(server, gateway)


def _cmdline_has(proc: Path, text: str) -> bool:
    try:
        return text.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def test_ice_servers_reach_the_pages_peer_connection(driver: Any, server: ServerHarness) -> None:
    turn = IceServer("turn:127.0.0.1:9?transport=udp", "alice", "s3cret")   # nothing listens: never reached
    gateway = GatewayHarness(server.address, ice_servers=(IceServer("stun:127.0.0.1:9"), turn))
    try:
        open_tab(driver, gateway.url + "/")
        driver.execute_script("document.getElementById('toggle').click()")
        servers = wait_until("the page's RTCPeerConnection", lambda: driver.execute_script(
            "return window.streamgen.iceServers"))
        assert [(s["urls"] if isinstance(s["urls"], str) else s["urls"][0], s.get("username") or None,
                 s.get("credential") or None)
                for s in servers] == [("stun:127.0.0.1:9", None, None),
                                      ("turn:127.0.0.1:9?transport=udp", "alice", "s3cret")]
        close_tab(driver)
        deadline = time.monotonic() + 20
        while gateway.num_viewers() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        gateway.close()
