"""Full-duplex spoken dialogue agent: model, engine and the public API.

`from duplex_agent.agent import Agent` works; the names load lazily so that importing the command
line stays quick.
"""
_EXPORTS = {
    "Agent": "duplex_agent.agent.api", "AgentFull": "duplex_agent.agent.api",
    "Conversation": "duplex_agent.agent.api", "ConversationClosed": "duplex_agent.agent.api",
    "AudioOut": "duplex_agent.agent.events", "ErrorOut": "duplex_agent.agent.events",
    "TextOut": "duplex_agent.agent.events", "UserWord": "duplex_agent.agent.events",
    "LMConfig": "duplex_agent.agent.config", "SamplingConfig": "duplex_agent.agent.config",
    "PersonaError": "duplex_agent.checkpoints.personaplex",
    "VoicePrompt": "duplex_agent.checkpoints.personaplex",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'duplex_agent.agent' has no attribute {name!r}")
