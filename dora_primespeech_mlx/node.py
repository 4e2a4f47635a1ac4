"""Dora node `dora-primespeech-mlx`: the drop-in replacement for dora-primespeech.

The only module that imports `dora`. A thin loop: events go to `TTSService` (node_service.py), whose
worker thread synthesises; outputs are sent from this thread, which owns the node.
Works with dora-rs 0.3.12 (mofa-studio's pin) and 1.x: on both a timed-out `next()` is an `ERROR`
event mentioning a timeout, and `None` means the event stream has ended.
"""

from __future__ import annotations

import gc
import logging
import os
import sys

from .node_service import NodeConfig, TTSService

POLL_SECONDS = 0.02  # how often outputs of the worker are flushed while no input arrives


def make_engine(config: NodeConfig):
    """The real engine; imported here so a missing or broken engine is an init error, not a crash."""
    from .engine import Engine

    return Engine(config.model_dir, use_ane=config.use_ane, precision=config.precision)


def _is_timeout(event: dict) -> bool:
    return event.get("type") == "ERROR" and "timeout" in str(event.get("error", "")).lower()


def run(node, service: TTSService) -> int:
    """Event loop over any object with dora's `next(timeout=)` and `send_output`."""
    send = node.send_output
    inputs_open = True
    while inputs_open:
        service.drain(send)
        event = node.next(timeout=POLL_SECONDS)
        if event is None:  # the event stream has ended
            break
        if _is_timeout(event):
            continue
        kind = event.get("type")
        if kind == "INPUT":
            if event["id"] == "text":
                service.handle_text(event["value"], event.get("metadata"))
            elif event["id"] == "control":
                service.handle_control(event["value"])
        elif kind == "STOP":
            # STOP with id ALL_INPUTS_CLOSED ends normally (finish queued texts); a real stop cancels
            inputs_open = False
            if event.get("id") != "ALL_INPUTS_CLOSED":
                service.cancel_all()
        elif kind == "ERROR":
            service.log("WARNING", f"dora reported an error event: {event.get('error')}")
    service.wait_idle(timeout=24 * 3600)
    service.close()
    service.drain(send)
    return 0


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from dora import Node

    config = NodeConfig.from_env()
    node = Node()
    service = TTSService(config, make_engine)  # warm-up: engine and startup voice before the loop
    code = run(node, service)
    # Everything has been sent. Drop the node (dora's Rust side closes its outputs) and leave without
    # running C++ static destructors: MLX used from the worker thread can otherwise abort the
    # interpreter at exit ("terminate called without an active exception", seen once in CI).
    del node, service
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
