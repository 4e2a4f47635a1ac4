"""Dora node `dora-primespeech-mlx`: the drop-in replacement for dora-primespeech.

The only module that imports `dora`. A thin loop: events go to `TTSService` (node_service.py), whose
`mlx-owner` thread loads, warms up and synthesises (all MLX work, engine.py's threading rule);
outputs are sent from this thread, which owns the Dora node and never touches MLX.
Works with dora-rs 0.3.12 (mofa-studio's pin) and 1.x: on both a timed-out `next()` is an `ERROR`
event mentioning a timeout, and `None` means the event stream has ended.
"""

from __future__ import annotations

import gc
import logging
import os
import sys

from .node_config import NodeConfig
from .node_service import TTSService

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
        if not service.owner_alive:
            # MLX state belongs to the dead thread and cannot be handed to another: end the node
            # (non-zero) after answering what is pending, rather than go silent
            service.log("ERROR", f"the MLX owner thread died ({service.owner_error}); the node exits so that "
                                 "the dataflow can restart it")
            service.fail_pending("the TTS engine thread died; the node is exiting")
            service.drain(send)
            return 1
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
                service.log("INFO", f"stop: cancelled {service.cancel_all()} request(s)")
        elif kind == "ERROR":
            service.log("WARNING", f"dora reported an error event: {event.get('error')}")
    while not service.wait_idle(timeout=POLL_SECONDS):  # finish queued texts, sending as they complete
        service.drain(send)
        if not service.owner_alive:
            break
    if not service.owner_alive:
        service.log("ERROR", f"the MLX owner thread died ({service.owner_error}); the node exits")
        service.fail_pending("the TTS engine thread died; the node is exiting")
        service.drain(send)
        return 1
    service.close()
    service.drain(send)
    return 0


def dora_version() -> str:
    try:
        from importlib.metadata import version

        return version("dora-rs")
    except Exception:  # noqa: BLE001 - informative only
        return "unknown"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from dora import Node

    from . import __version__

    config = NodeConfig.from_env()
    node = Node()
    # the engine loads and warms up on the service's MLX owner thread while this loop already reads events
    service = TTSService(config, make_engine)
    service.log("INFO", f"dora-primespeech-mlx {__version__} on dora-rs {dora_version()}, Python "
                        f"{sys.version.split()[0]}; loading voice {config.voice_name!r}")
    # Read no events until the engine is loaded and warmed up (its log lines still go out). Seen with
    # dora-rs 1.1 on a busy CPU: while this node waited in next() during a 2-minute load, with the
    # other nodes waiting on it, the daemon judged the dataflow finished and stopped every node.
    while not service.wait_ready(POLL_SECONDS):
        service.drain(node.send_output)
    code = run(node, service)
    # Everything has been sent and the owner thread has ended (service.close joined it). Drop the node
    # so dora's Rust side flushes and closes the outputs, then leave with os._exit: MLX keeps C++
    # per-thread stream state whose static destructors can abort a process that used MLX off the main
    # thread ("terminate called without an active exception"); skipping them is safe here because
    # nothing is left to write.
    del node, service
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
