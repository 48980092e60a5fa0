"""The OpenAI Realtime API: the websocket session (`session`), its events and codecs (`events`)
and the WebRTC call (`call`)."""
