"""The agent's text tokens as transcript text, one conversation at a time.

SentencePiece pieces carry "▁" for a word boundary (a space here). Tokenizers trained with byte
fallback (J-Moshi's Japanese one) spell characters outside their vocabulary as byte pieces
`<0xE3>` `<0x81>` `<0x93>`: one character's UTF-8 bytes, which the model may emit over several
steps. A `TextDecoder` per conversation keeps the bytes of an unfinished character and emits text
only once it is complete, so every piece of text handed on is valid, whole characters.
"""
from __future__ import annotations

import codecs


class PieceTable:
    """What each text id of a tokenizer stands for, looked up once per engine: None (pad,
    end-of-pad, control pieces such as </s>), an int (a byte-fallback piece's byte) or a str."""

    def __init__(self, tokenizer, no_text: set[int]):
        self._entries: list[str | int | None] = []
        for i in range(tokenizer.get_piece_size()):
            if i in no_text or tokenizer.is_control(i):
                self._entries.append(None)
            elif tokenizer.is_byte(i):
                self._entries.append(int(tokenizer.id_to_piece(i)[1:-1], 16))  # "<0xE3>"
            else:
                self._entries.append(tokenizer.id_to_piece(i).replace("\u2581", " "))

    def __getitem__(self, text_id: int) -> str | int | None:
        if 0 <= text_id < len(self._entries):
            return self._entries[text_id]
        return None


class TextDecoder:
    """Incremental decoder of one conversation's text ids. `feed` returns the text that became
    complete with this id, or None. A character left unfinished when ordinary text follows is
    shown as U+FFFD (the model never finished it), as is a malformed byte sequence."""

    def __init__(self, table: PieceTable):
        self._table = table
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = False  # bytes of an unfinished character are held

    def feed(self, text_id: int) -> str | None:
        entry = self._table[text_id]
        if entry is None:  # pads between the bytes of one character keep them pending
            return None
        if isinstance(entry, int):
            text = self._bytes.decode(bytes((entry,)))
            self._pending = bool(self._bytes.getstate()[0])
            return text or None
        if self._pending:
            entry = self._bytes.decode(b"", final=True) + entry
            self._bytes.reset()
            self._pending = False
        return entry
