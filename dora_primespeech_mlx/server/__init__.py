"""The OpenAI-compatible speech server (`gpt-sovits-mlx serve`, docs/server.md); extra `[server]`.

Nothing is imported here, so that `import dora_primespeech_mlx.server` works without Starlette: the app
is `dora_primespeech_mlx.server.app.create_app`.
"""
