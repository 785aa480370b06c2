"""`canopy flash` end to end: the real esptool (in-process) against fake ROM bootloaders."""

from __future__ import annotations

import hashlib
import json

import pytest
from esp_pylib.logger import EspLog

from canopy_host import cli
from canopy_host.flash import ListSink, fallback_bauds, flash_nodes
from canopy_host.boards import load_board
from canopy_host.esp_image import parse_image
from fake_esp import FakeConfig, FakeEsp, Faults
from fake_esp.images import build_image

FAST = 2_000_000  # transfer rate for tests: paced like a UART, but quick
BOARD_CHIP = {"esp32-devkitc": "ESP32", "esp32s3-devkitc": "ESP32-S3", "esp32c3-devkitm": "ESP32-C3"}


def fake(chip="ESP32", **kw) -> FakeEsp:
    kw.setdefault("initial_baud", FAST)
    return FakeEsp(FakeConfig(chip=chip, **kw))


def canopy_flash(capsys, *argv: str) -> tuple[int, dict | None, str]:
    rc = cli.main(["flash", "--quiet", "--connect-attempts", "1", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    report = json.loads(out) if out.strip() else None
    return rc, report, err


@pytest.fixture
def image_file(tmp_path):
    def make(chip="ESP32", size=30_000, seed=1):
        path = tmp_path / f"{chip}-{seed}.bin"
        path.write_bytes(build_image(chip, size, seed=seed))
        return path

    return make


@pytest.mark.parametrize("board", sorted(BOARD_CHIP))
def test_flash_writes_image_at_board_offset(capsys, image_file, board):
    chip = BOARD_CHIP[board]
    fw = image_file(chip)
    data = fw.read_bytes()
    offset = load_board(board).flash_offset
    mac = bytes.fromhex("7cdfa1000001")
    with fake(chip, mac=mac) as dev:
        rc, report, err = canopy_flash(capsys, "--board", board, "--firmware", str(fw), "--port", dev.url, "--baud", str(FAST))
        flash = bytes(dev.flash)
    assert rc == 0, err
    assert flash[offset : offset + len(data)] == data
    assert flash[:offset] == b"\xff" * offset
    assert flash[offset + len(data) : offset + len(data) + 4096] == b"\xff" * 4096
    node = report["nodes"][0]
    assert node["result"] == "ok" and node["error"] is None
    assert node["chip"] == chip
    assert node["mac"] == "7c:df:a1:00:00:01"
    assert node["offset"] == offset
    assert node["image_sha256"] == hashlib.sha256(data).hexdigest()
    assert node["image_size"] == len(data)
    assert node["flash_size"] == 4 * 1024 * 1024
    assert node["baud"] == FAST
    assert node["duration_s"] > 0


def test_revision_is_reported(capsys, image_file):
    fw = image_file("ESP32")
    with fake("ESP32", revision=(1, 0)) as dev:
        rc, report, _ = canopy_flash(capsys, "--board", "esp32-devkitc", "--firmware", str(fw), "--port", dev.url)
    assert rc == 0
    assert report["nodes"][0]["revision"] == "v1.0"


def test_chip_that_does_not_match_board_is_refused(capsys, image_file):
    fw = image_file("ESP32")
    with fake("ESP32-S3") as dev:
        rc, report, err = canopy_flash(capsys, "--board", "esp32-devkitc", "--firmware", str(fw), "--port", dev.url)
        untouched = dev.flash == b"\xff" * len(dev.flash)
        log = list(dev.device.log)
    assert rc == 1
    node = report["nodes"][0]
    assert node["result"] == "refused"
    assert "ESP32-S3" in node["error"] and "esp32-devkitc" in node["error"]
    assert "esp32s3-devkitc" in node["error"]  # names the board that would fit
    assert untouched
    assert not {"0x02", "0x10", "0xd0"} & set(log)  # no FLASH_BEGIN / FLASH_DEFL_BEGIN / ERASE


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"\x7fELF" + bytes(200), "ELF"),
        (b"\xff" * 4096, "0xFF"),
        (b"hello world, not firmware" * 10, "0xE9"),
        (b"\xe9", "too short"),
    ],
)
def test_file_that_is_not_an_image_is_refused_before_connecting(capsys, tmp_path, content, needle):
    fw = tmp_path / "bad.bin"
    fw.write_bytes(content)
    with fake("ESP32") as dev:
        rc, report, err = canopy_flash(capsys, "--board", "esp32-devkitc", "--firmware", str(fw), "--port", dev.url)
        connections = dev.connections
    assert rc == 2 and report is None
    assert needle in err and "error:" in err
    assert connections == 0


def test_corrupt_image_checksum_is_refused(capsys, tmp_path, image_file):
    data = bytearray(image_file("ESP32").read_bytes())
    data[24 + 8 + 10] ^= 0xFF  # a byte inside the first segment
    fw = tmp_path / "corrupt.bin"
    fw.write_bytes(bytes(data))
    rc, _, err = canopy_flash(capsys, "--board", "esp32-devkitc", "--firmware", str(fw), "--port", "socket://127.0.0.1:9")
    assert rc == 2 and "checksum" in err


def test_image_for_another_chip_is_refused_before_connecting(capsys, image_file):
    fw = image_file("ESP32-S3")
    with fake("ESP32") as dev:
        rc, report, err = canopy_flash(capsys, "--board", "esp32-devkitc", "--firmware", str(fw), "--port", dev.url)
        connections = dev.connections
    assert rc == 2 and report is None
    assert "built for ESP32-S3" in err
    assert connections == 0


def test_image_larger_than_detected_flash_is_refused(capsys, image_file):
    fw = image_file("ESP32", size=300_000)
    with fake("ESP32", flash_size=256 * 1024) as dev:
        rc, report, err = canopy_flash(capsys, "--board", "esp32-devkitc", "--firmware", str(fw), "--port", dev.url)
        untouched = dev.flash == b"\xff" * len(dev.flash)
    assert rc == 1
    node = report["nodes"][0]
    assert node["result"] == "refused"
    assert "262144" in node["error"]
    assert untouched


def test_md5_mismatch_is_a_failure_after_slower_retries(capsys, image_file):
    fw = image_file("ESP32", size=8_000)
    with fake("ESP32", faults=Faults(bad_write=True)) as dev:
        rc, report, err = canopy_flash(capsys, "--board", "esp32-devkitc", "--firmware", str(fw), "--port", dev.url, "--baud", str(FAST))
    assert rc == 1
    node = report["nodes"][0]
    assert node["result"] == "failed"
    assert "verify" in node["error"]
    assert "--baud" in node["hint"]
    assert [a["baud"] for a in node["attempts"]] == fallback_bauds(FAST)
    assert all(a["error"] for a in node["attempts"])
    assert "not flashed" in err


def test_dropped_connection_is_a_failure(capsys, image_file):
    fw = image_file("ESP32-C3", size=60_000)
    with fake("ESP32-C3", faults=Faults(drop_after=3000)) as dev:
        rc, report, err = canopy_flash(capsys, "--board", "esp32c3-devkitm", "--firmware", str(fw), "--port", dev.url, "--baud", str(FAST))
        assert dev.unplugged
    assert rc == 1
    node = report["nodes"][0]
    assert node["result"] == "failed"
    assert "lost the connection" in node["error"]
    assert "cable" in node["hint"]


def test_no_sync_reply_gives_a_clear_error(capsys, image_file):
    fw = image_file("ESP32")
    with fake("ESP32", faults=Faults(no_sync=True)) as dev:
        rc, report, err = canopy_flash(capsys, "--board", "esp32-devkitc", "--firmware", str(fw), "--port", dev.url)
    assert rc == 1
    node = report["nodes"][0]
    assert node["result"] == "failed"
    assert "no answer from the bootloader" in node["error"]
    assert "BOOT" in node["hint"]
    assert len(node["attempts"]) == 1  # a lower transfer rate cannot help a dead link


def test_port_that_cannot_be_opened(capsys, image_file):
    fw = image_file("ESP32")
    with fake("ESP32") as dev:
        url = dev.url
    rc, report, _ = canopy_flash(capsys, "--board", "esp32-devkitc", "--firmware", str(fw), "--port", url)
    assert rc == 1
    assert report["nodes"][0]["result"] == "failed"
    assert "cannot open" in report["nodes"][0]["error"]


def test_parallel_flash_of_several_nodes_and_report_file(capsys, image_file, tmp_path):
    fw = image_file("ESP32-S3", size=50_000)
    data = fw.read_bytes()
    macs = [bytes([0x34, 0x85, 0x18, 0, 0, i]) for i in range(4)]
    devs = [fake("ESP32-S3", mac=m).start() for m in macs]
    out_file = tmp_path / "report.json"
    try:
        ports = [a for d in devs for a in ("--port", d.url)]
        rc, report, err = canopy_flash(
            capsys, "--board", "esp32s3-devkitc", "--firmware", str(fw), *ports, "--baud", str(FAST), "--report", str(out_file)
        )
        flashes = [bytes(d.flash[: len(data)]) for d in devs]
    finally:
        for d in devs:
            d.close()
    assert rc == 0, err
    assert flashes == [data] * 4
    nodes = report["nodes"]
    assert [n["port"] for n in nodes] == [d.url for d in devs]
    assert [n["mac"] for n in nodes] == [":".join(f"{b:02x}" for b in m) for m in macs]
    assert all(n["result"] == "ok" for n in nodes)
    assert json.loads(out_file.read_text()) == report


def test_one_failing_node_does_not_spoil_the_others(capsys, image_file):
    fw = image_file("ESP32")
    with fake("ESP32") as good, fake("ESP32", faults=Faults(no_sync=True)) as bad:
        rc, report, _ = canopy_flash(capsys, "--board", "esp32-devkitc", "--firmware", str(fw), "--port", good.url, "--port", bad.url)
    assert rc == 1
    assert [n["result"] for n in report["nodes"]] == ["ok", "failed"]


def test_erase_wipes_the_rest_of_flash(capsys, image_file):
    fw = image_file("ESP32")
    with fake("ESP32") as dev:
        dev.flash[0x200000:0x201000] = b"\x00" * 0x1000  # an old filesystem
        rc, _, _ = canopy_flash(capsys, "--board", "esp32-devkitc", "--firmware", str(fw), "--port", dev.url)
        kept = bytes(dev.flash[0x200000:0x201000])
        rc2, _, _ = canopy_flash(capsys, "--board", "esp32-devkitc", "--firmware", str(fw), "--port", dev.url, "--erase")
        wiped = bytes(dev.flash[0x200000:0x201000])
        data = fw.read_bytes()
        assert bytes(dev.flash[0x1000 : 0x1000 + len(data)]) == data
    assert rc == rc2 == 0
    assert kept == b"\x00" * 0x1000
    assert wiped == b"\xff" * 0x1000


def test_output_is_routed_to_each_nodes_sink_and_logger_restored(image_file):
    board = load_board("esp32-devkitc")
    image = parse_image(image_file("ESP32").read_bytes())
    import esptool.loader

    before, before_hex = EspLog.instance, esptool.loader.HexFormatter
    sinks: dict[str, ListSink] = {}
    with fake("ESP32") as a, fake("ESP32") as b:
        reports = flash_nodes([a.url, b.url], board, image, FAST, connect_attempts=1, make_sink=lambda p: sinks.setdefault(p, ListSink()))
    assert EspLog.instance is before and esptool.loader.HexFormatter is before_hex
    assert [r.result for r in reports] == ["ok", "ok"]
    for own, other in ((a.url, b.url), (b.url, a.url)):
        text = "\n".join(sinks[own].lines)
        assert own in text and other not in text  # esptool names the port in its notes
        assert sinks[own].last_progress is not None
        done, total = sinks[own].last_progress
        assert done == total > 0


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--board", "nope"], "unknown board 'nope'"),
        (["--board", "unix-sim"], "virtual node"),
        (["--board", "esp32-devkitc", "--baud", "12"], "--baud"),
    ],
)
def test_bad_arguments_give_clear_errors(capsys, tmp_path, image_file, argv, needle):
    fw = image_file("ESP32")
    rc, report, err = canopy_flash(capsys, "--firmware", str(fw), "--port", "socket://127.0.0.1:9", *argv)
    assert rc == 2 and report is None
    assert needle in err


def test_missing_firmware_file(capsys, tmp_path):
    rc, _, err = canopy_flash(capsys, "--board", "esp32-devkitc", "--firmware", str(tmp_path / "nope.bin"), "--port", "socket://127.0.0.1:9")
    assert rc == 2 and "does not exist" in err


def test_fallback_plan():
    assert fallback_bauds(921600) == [921600, 460800, 115200]
    assert fallback_bauds(460800) == [460800, 230400, 115200]
    assert fallback_bauds(115200) == [115200]
    assert fallback_bauds(1000000) == [1000000, 921600, 115200]


def test_flash_all_finds_ports_by_board_usb_id(capsys, image_file, monkeypatch):
    from serial.tools import list_ports, list_ports_common

    fw = image_file("ESP32")
    with fake("ESP32") as a, fake("ESP32") as b, fake("ESP32-S3") as other:
        listed = []
        for dev, (vid, pid) in ((a, (0x1A86, 0x7523)), (b, (0x10C4, 0xEA60)), (other, (0x303A, 0x1001))):
            info = list_ports_common.ListPortInfo(dev.url, skip_link_detection=True)
            info.vid, info.pid = vid, pid
            listed.append(info)
        monkeypatch.setattr(list_ports, "comports", lambda *a, **k: listed)
        rc, report, err = canopy_flash(capsys, "--board", "esp32-devkitc", "--firmware", str(fw), "--all")
        assert other.connections == 0  # 303A:1001 is not an esp32-devkitc bridge
    assert rc == 0, err
    assert sorted(n["port"] for n in report["nodes"]) == sorted([a.url, b.url])
