"""The server's default limits: the command line's defaults and streams.security.Policy's."""
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20  # websocket; a browser sends a few hundred bytes per message
DEFAULT_MAX_OFFER_BYTES = 64 << 10  # a browser's audio offer is 2-10 kB
DEFAULT_IDLE_TIMEOUT_S = 60.0
DEFAULT_MAX_CONVERSATION_S = 3600.0
