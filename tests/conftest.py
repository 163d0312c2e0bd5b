"""Test session setup: offline, no hub, no network, tiny models built once per session."""
import os

# Before anything imports transformers/diffusers: a hidden hub call must fail, not hang.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ipaddress  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402

import pytest  # noqa: E402

_real_connect = socket.socket.connect


def _guarded_connect(sock, address):
    """Allow loopback and unix sockets only: any other connect is a bug in a test or the product."""
    if isinstance(address, tuple) and address:
        host = address[0]
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise RuntimeError(f"network guard: test tried to connect to {address!r}")
    return _real_connect(sock, address)


socket.socket.connect = _guarded_connect

# Ctrl-C is part of what the suite tests (here and in the gcr processes it starts). A shell that runs it
# in the background (`cmd &`, nohup) starts it with SIGINT ignored, which every child would inherit:
# take Python's own handler back, so children start with the default (exec resets a handled signal).
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Session cache of tiny random-weight checkpoints, built by gcr.tiny (the same code selftest uses)."""
    built = {}

    def get(family: str):
        if family not in built:
            from gcr import tiny

            out = tmp_path_factory.mktemp(family.replace(".", "-"))
            if family.startswith("critic"):
                built[family] = tiny.build_tiny_critic(out)
            elif family == "clip":
                built[family] = tiny.build_tiny_clip(out)
            else:
                built[family] = tiny.build_tiny_pipeline(family, out)
        return built[family]

    return get
