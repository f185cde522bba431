"""Distillation across tokenizers: which teacher position a student position can learn from, and
what the teacher's next-token distribution says about the student's vocabulary.

Spelling. Every token id spells a byte string: byte-level BPE tokens (GPT-2, Llama 3, Qwen,
SmolLM2, `predistill tokenizer`) through the inverse of the byte-to-character table; SentencePiece
tokens with `▁` as a space and `<0xXX>` byte-fallback pieces as that byte. EOS spells the one byte
0xFF, which never occurs in UTF-8 text, so document ends align with each other and with nothing
else; other special tokens spell nothing and are never a mapping target. A space that starts a
document piece in one spelling only was added by that tokenizer (SentencePiece's dummy prefix): it
is taken off.

Alignment. Student position i (it has read student tokens 0..i) is aligned with teacher position j
when both have read exactly the same bytes: the first i+1 student tokens and the first j+1 teacher
tokens spell the same prefix of the text. Then both predict what follows from the same byte offset.
Positions without such a teacher position (inside a teacher token, or past a point where the two
spellings differ, e.g. a character cut in half at an instance edge) get the LM loss only.

Vocabulary mapping. At an aligned position, a teacher entry whose spelling is a student token's
maps to that token. The rest of the teacher's mass goes, by rule:
- `exact`: nowhere — with `--kd-tail bucket` it is the tail class, with `drop` it is renormalised away;
- `first`: to the student token its tokenizer emits first when it encodes the teacher token's text,
  the token the student reads first if the text goes on as the teacher predicts (" develop" → " de"
  when the student splits it " de|velop"); a teacher token that is not whole UTF-8 text, or whose
  encoding does not start with a prefix of it, falls back to `prefix`;
- `prefix`: to the longest student token that is a prefix of the teacher token's spelling (" dev"
  above: often not what the student's tokenizer emits, so its targets disagree with the LM loss's).
Spreading the mass over every prefix would reward one-byte tokens the student never emits there.
Entries that map to the same student token are summed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from predistill.core.artifacts import PredistillError
from predistill.formats.logits import TeacherTargets

EOS_BYTES = b"\xff"  # never in UTF-8 text
VOCAB_MAPS = ("exact", "first", "prefix")


def _byte_decoder() -> dict[str, int]:
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _is_byte_level(tokenizer) -> bool:
    if not getattr(tokenizer, "is_fast", False):
        return False
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    return "ByteLevel" in json.dumps(definition.get("pre_tokenizer"))


def token_spellings(tokenizer) -> list[bytes | None]:
    """Per id of `tokenizer` (its full length, added tokens included): the bytes it spells, EOS_BYTES
    for EOS, None for other special tokens."""
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_ids)
    byte_level = _is_byte_level(tokenizer)
    byte_of = _byte_decoder() if byte_level else {}
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i == tokenizer.eos_token_id:
            out.append(EOS_BYTES)
        elif i in special or piece is None:
            out.append(None)
        elif byte_level and all(c in byte_of for c in piece):
            out.append(bytes(byte_of[c] for c in piece))
        elif not byte_level and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))  # SentencePiece byte fallback
        elif not byte_level:
            out.append(piece.replace("▁", " ").encode("utf-8"))
        else:  # an added (non-byte-level) token of a byte-level tokenizer: its text as it decodes
            out.append(tokenizer.decode([i], clean_up_tokenization_spaces=False).encode("utf-8"))
    return out


class Speller:
    """A tokenizer's spellings as arrays, for spelling many sequences quickly."""

    def __init__(self, spellings: list[bytes | None], eos_id: int, first_token=None):
        self.spellings = spellings
        self.lengths = np.array([len(s) if s is not None else 0 for s in spellings], dtype=np.int64)
        self.eos_id = eos_id
        self.first_token = first_token  # text → the id the tokenizer emits first (None: unknown)

    @classmethod
    def of(cls, tokenizer) -> Speller:
        def first_token(text: str) -> int | None:
            ids = tokenizer.encode(text, add_special_tokens=False)
            return ids[0] if ids else None

        return cls(token_spellings(tokenizer), tokenizer.eos_token_id, first_token)

    def spell(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the bytes `ids` spell as uint8, bytes per token)."""
        ids = np.asarray(ids, np.int64)
        data = np.frombuffer(b"".join(self.spellings[i] or b"" for i in ids.tolist()), np.uint8)
        return data, self.lengths[ids]


def _piece_starts(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """Token indices where a document piece starts: 0 and after every EOS."""
    return np.concatenate([[0], np.flatnonzero(ids[:-1] == eos_id) + 1]) if len(ids) else np.zeros(0, np.int64)


def _drop_extra_spaces(
    a: tuple[np.ndarray, np.ndarray], a_starts: np.ndarray, b: tuple[np.ndarray, np.ndarray], b_starts: np.ndarray
):
    """Both sequences spell one text, piece by piece; a space that starts a piece on one side only was
    added by that tokenizer (SentencePiece's dummy prefix): it is taken off (not read by anyone)."""
    (a_data, a_len), (b_data, b_len) = a, b
    a_len, b_len = a_len.copy(), b_len.copy()
    a_off, b_off = np.cumsum(a_len) - a_len, np.cumsum(b_len) - b_len
    a_drop, b_drop = [], []
    for i, j in zip(a_starts.tolist(), b_starts.tolist()):
        a_space = a_len[i] > 0 and a_data[a_off[i]] == 0x20
        b_space = b_len[j] > 0 and b_data[b_off[j]] == 0x20
        if a_space and not b_space:
            a_drop.append(i)
        elif b_space and not a_space:
            b_drop.append(j)
    a_len[a_drop] -= 1  # (copies: the spellers' arrays stay as they are)
    b_len[b_drop] -= 1
    return (np.delete(a_data, a_off[a_drop]), a_len), (np.delete(b_data, b_off[b_drop]), b_len)


def align(
    student_ids: np.ndarray,
    teacher_ids: np.ndarray,
    student: Speller,
    teacher: Speller,
    teacher_positions: int | None = None,
) -> np.ndarray:
    """For each student position i (after reading student tokens 0..i), the teacher position j that
    has read exactly the same bytes, or −1. Teacher positions ≥ `teacher_positions` (default: the
    teacher's last token, which predicts nothing) count as absent."""
    student_ids, teacher_ids = np.asarray(student_ids, np.int64), np.asarray(teacher_ids, np.int64)
    s_starts, t_starts = _piece_starts(student_ids, student.eos_id), _piece_starts(teacher_ids, teacher.eos_id)
    (s_data, s_len), (t_data, t_len) = _drop_extra_spaces(
        student.spell(student_ids), s_starts, teacher.spell(teacher_ids), t_starts
    )
    n = min(len(s_data), len(t_data))
    differ = np.flatnonzero(s_data[:n] != t_data[:n])
    same_upto = int(differ[0]) if len(differ) else n  # both spell the same bytes [0, same_upto)
    s_end, t_end = np.cumsum(s_len), np.cumsum(t_len)
    if teacher_positions is None:
        teacher_positions = max(len(teacher_ids) - 1, 0)
    j = np.searchsorted(t_end, s_end)  # the first teacher position that has read at least as much
    found = j < len(t_end)
    j = np.where(found, j, 0)
    ok = found & (t_end[j] == s_end) & (s_end <= same_upto) & (j < teacher_positions) & (s_len > 0)
    return np.where(ok, j, -1)


class VocabMap:
    """Teacher id → student id (−1: unmapped) under a rule (see the module doc)."""

    def __init__(self, teacher: Speller, student: Speller, rule: str):
        if rule not in VOCAB_MAPS:
            raise PredistillError(f"--kd-vocab-map must be one of {', '.join(VOCAB_MAPS)}, got {rule!r}")
        index: dict[bytes, int] = {}
        for sid, spelled in enumerate(student.spellings):
            if spelled:
                index.setdefault(spelled, sid)  # the lowest id of equal spellings
        self.rule = rule
        self.to_student = np.full(len(teacher.spellings), -1, dtype=np.int64)
        self.exact = np.zeros(len(teacher.spellings), dtype=bool)
        if rule == "first" and student.first_token is None:
            raise PredistillError("--kd-vocab-map first needs the student's tokenizer")
        longest = max(map(len, index), default=0)
        for tid, spelled in enumerate(teacher.spellings):
            if not spelled:
                continue
            exact_sid = index.get(spelled)
            if exact_sid is not None:
                self.to_student[tid], self.exact[tid] = exact_sid, True
            elif rule != "exact":
                first = _first_prefix(spelled, student) if rule == "first" else None
                self.to_student[tid] = first if first is not None else _longest_prefix(spelled, index, longest)

    def describe(self) -> dict:
        spelled = int((self.to_student >= 0).sum())
        return {
            "rule": self.rule,
            "teacher_ids": len(self.to_student),
            "exact": int(self.exact.sum()),
            "mapped": spelled,
        }


def _first_prefix(spelled: bytes, student: Speller) -> int | None:
    """The student's first token of the text `spelled`, when it is text and that token a prefix of it."""
    try:
        text = spelled.decode("utf-8")
    except UnicodeDecodeError:
        return None
    sid = student.first_token(text)
    token = student.spellings[sid] if sid is not None else None
    return sid if token and token != EOS_BYTES and spelled.startswith(token) else None


def _longest_prefix(spelled: bytes, index: dict[bytes, int], longest: int) -> int:
    for k in range(min(len(spelled) - 1, longest), 0, -1):
        if (sid := index.get(spelled[:k])) is not None:
            return sid
    return -1


@dataclass
class MappingStats:
    """Counts a cross-tokenizer KD source adds up over training (saved in the run's manifest)."""

    positions: float = 0.0  # student positions trained
    aligned: float = 0.0  # of which had an aligned teacher position
    teacher_mass: float = 0.0  # Σ teacher probability retained at aligned positions
    mapped_mass: float = 0.0  # of which landed on a student token

    def as_list(self) -> list[float]:
        return [self.positions, self.aligned, self.teacher_mass, self.mapped_mass]

    def summary(self) -> dict:
        return {
            "aligned_fraction": self.aligned / self.positions if self.positions else None,
            "mapped_mass": self.mapped_mass / self.teacher_mass if self.teacher_mass else None,
        }


def map_targets(targets: TeacherTargets, vocab: VocabMap) -> tuple[TeacherTargets, float, float]:
    """Teacher entries [N, K] (teacher ids) → entries in student ids [N, K'] (same log-prob
    semantics: full-vocabulary log-probs, or sample weights), entries with one student id summed,
    unmapped entries left out. Also (Σ retained teacher mass, Σ mapped mass)."""
    ids, lps, mask = targets.ids.numpy(), targets.logprobs.numpy().astype(np.float64), targets.mask.numpy()
    probs = np.where(mask, np.exp(lps), 0.0)
    sid = np.where(mask, vocab.to_student[np.where(mask, ids, 0)], -1)
    keep = sid >= 0
    rows, cols = np.nonzero(keep)
    n = ids.shape[0]
    if len(rows) == 0:
        empty = torch.zeros((n, 1))
        return (TeacherTargets(empty.long(), empty.float(), empty.bool()), float(probs.sum()), 0.0)
    s, p = sid[rows, cols], probs[rows, cols]
    order = np.lexsort((s, rows))
    rows, s, p = rows[order], s[order], p[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (s[1:] != s[:-1])
    starts = np.flatnonzero(first)
    rows, s, p = rows[starts], s[starts], np.add.reduceat(p, starts)
    row_start = np.searchsorted(rows, np.arange(n))
    slot = np.arange(len(rows)) - row_start[rows]
    k = int(slot.max()) + 1
    out_ids = np.zeros((n, k), np.int64)
    out_lps = np.zeros((n, k), np.float32)
    out_mask = np.zeros((n, k), dtype=bool)
    out_ids[rows, slot], out_lps[rows, slot], out_mask[rows, slot] = s, np.log(p), True
    return (
        TeacherTargets(torch.from_numpy(out_ids), torch.from_numpy(out_lps), torch.from_numpy(out_mask)),
        float(probs.sum()),
        float(p.sum()),
    )
