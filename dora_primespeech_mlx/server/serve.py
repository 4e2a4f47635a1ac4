"""`gpt-sovits-mlx serve`: run the speech server with uvicorn. Imports nothing of the extra until it runs,
so the CLI works (and says what to install) without it."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from dataclasses import replace

INSTALL_HINT = "pip install 'dora-primespeech-mlx[server]'"


def missing_extra() -> str | None:
    """The first package of the `server` extra that does not import, else None."""
    import importlib

    for module, package in (("starlette", "starlette"), ("uvicorn", "uvicorn"), ("multipart", "python-multipart")):
        try:
            importlib.import_module(module)
        except ImportError:
            return package
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    missing = missing_extra()
    if missing is not None:
        print(f"error: `gpt-sovits-mlx serve` needs the server extra ({missing} is not installed): {INSTALL_HINT}",
              file=sys.stderr)
        return 2
    import uvicorn

    from ..node_config import NodeConfig
    from ..voices import expand_path
    from .app import API_KEY_ENV, create_app

    config = NodeConfig.from_env()
    if args.model_dir:
        config = replace(config, model_dir=expand_path(args.model_dir))
    logging.getLogger().setLevel(config.log_level)
    if not _loopback(args.host) and not os.environ.get(API_KEY_ENV, "").strip():
        logging.getLogger(__name__).warning(
            "serving on %s without an API key: anyone who can reach this address can synthesise and add voices; "
            "set %s", args.host, API_KEY_ENV)
    app = create_app(config, voices_dir=args.voices_dir)
    uvicorn.run(app, host=args.host, port=args.port, log_level=config.log_level.lower(), access_log=True)
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible speech server (extra [server]; docs/server.md)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-dir", default=None, help="default: $PRIMESPEECH_MODEL_DIR, else ~/.dora/models/primespeech")
    p.add_argument("--voices-dir", default=None,
                   help="folder for voices added through the API (default: $GPT_SOVITS_VOICES_DIR, else "
                        "~/.config/dora-primespeech-mlx/voices)")
    p.set_defaults(func=cmd_serve)
