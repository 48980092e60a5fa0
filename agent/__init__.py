"""Full-duplex spoken dialogue agent: model, engine and the public API."""
from agent.api import (Agent, AgentFull, AudioOut, Conversation, ConversationClosed, ErrorOut,
                       TextOut)
from agent.config import LMConfig, SamplingConfig

__all__ = ["Agent", "AgentFull", "AudioOut", "Conversation", "ConversationClosed", "ErrorOut",
           "TextOut", "LMConfig", "SamplingConfig"]
