"""Phone calls: Twilio Media Streams (and the close variants of SignalWire, Telnyx, Fonoster)
bridged to conversations. `webhook` answers the call's webhook and admits its media stream;
`twilio` is the stream itself."""

VOICE_PATH = "/twilio/voice"  # the webhook a phone number calls
STREAM_PATH = "/twilio/stream"  # + "/{credential}": a call's media stream
