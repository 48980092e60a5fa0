"""Full-duplex spoken dialogue agent: model, engine and the public API.

`from agent import Agent` works; the names load lazily so that `import agent.cli` stays quick.
"""
_EXPORTS = {
    "Agent": "agent.api", "AgentFull": "agent.api", "AudioOut": "agent.api",
    "Conversation": "agent.api", "ConversationClosed": "agent.api", "ErrorOut": "agent.api",
    "TextOut": "agent.api", "LMConfig": "agent.config", "SamplingConfig": "agent.config",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'agent' has no attribute {name!r}")
