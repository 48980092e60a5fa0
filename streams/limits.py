"""The server's default limits: the command line's defaults and streams.security.Policy's."""
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20  # websocket; a browser sends a few hundred bytes per message
DEFAULT_MAX_OFFER_BYTES = 64 << 10  # a browser's audio offer is 2-10 kB
# HTTP request line (aiohttp's default is 8190): /api/chat?text_prompt=... carries a persona's
# role, URL-encoded; any role a context window can hold reaches the agent, which judges it.
MAX_REQUEST_LINE_BYTES = 64 << 10
DEFAULT_IDLE_TIMEOUT_S = 60.0
DEFAULT_MAX_CONVERSATION_S = 3600.0
