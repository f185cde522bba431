"""KD sources for `predistill train`: where L_kd's teacher signal comes from.

A KD source has
- `flops_per_token`: teacher FLOPs spent per trained token at training time (0 when offline);
- `batch(ids, inputs)`: what its loss needs for a micro-batch, read before the forward;
- `losses(hidden, weight, inputs, targets, mask, kd_batch, alpha)` → (Σ L_lm, Σ L_kd, L_lm and L_kd
  per position [B, L]), computed from the student's final hidden states and lm-head weight without
  [B·L × V] logits; the sums carry the gradients and enter the loss as (1 − α)·Σ L_lm + α·Σ L_kd
  (times any common factor), the per-position values are for logging.

Three sources:
- `OfflineLogits` (PD): a logits store written by `predistill score --logits-out` (or by a model
  that saved its own *online logits* while it trained). The LM loss and KD share one pass over the
  vocabulary with both gradients computed in it (predistill.kd.fused_lm_kd_loss), so an offline-KD
  step costs about an LM-only step.
- `OnlineTeacher` (Vanilla KD): a teacher model run on every micro-batch; full-vocabulary KD
  (predistill.kd.online_kd_loss); its 2·N_teacher FLOPs per token are counted.
- `MiniLLM`: reverse KL on the student's own samples, scored by an online teacher (see the class).
"""

from __future__ import annotations

import numpy as np
import torch

from predistill.artifacts import PredistillError
from predistill.kd import KDConfig, fused_lm_kd_loss, fused_online_lm_kd_loss
from predistill.losses import lm_loss
from predistill.models import forward_params, head_weight, load_model, model_body, tokenizer_hash
from predistill.store import TokenStore


def forward_flops_per_token(model, vocab_size: int | None = None) -> int:
    """A forward costs 2·N per token (N: `models.forward_params`)."""
    return 2 * forward_params(model, vocab_size)


class OfflineLogits:
    flops_per_token = 0  # the teacher pass was paid offline; its FLOPs are in the score table's manifest

    def __init__(self, path: str, store: TokenStore, kd_cfg: KDConfig):
        from predistill.logits import LogitsStore

        self.store = LogitsStore(path, store)  # refuses another token store or tokenizer, naming both hashes
        self.kd_cfg = kd_cfg
        # ids are the tokenizer's; stores written before padding was masked recorded the teacher's head
        # rows instead, and an entry past the tokenizer would be a padding row: refuse those stores
        if self.store.manifest.get("vocab_size", store.vocab_size) > store.vocab_size:
            raise PredistillError(f"logits store {path} has a vocabulary of {self.store.manifest['vocab_size']} ids, "
                                  f"the token store's tokenizer {store.vocab_size}: rewrite it with this predistill "
                                  "(padded teacher rows are no longer stored)")

    def batch(self, ids, inputs: torch.Tensor):
        return self.store.read_batch(ids, inputs.shape[1])

    def losses(self, hidden, weight, inputs, targets, mask, kd_batch, alpha):
        return fused_lm_kd_loss(hidden, weight, targets, kd_batch, self.kd_cfg, mask, weights=(1 - alpha, alpha))


class OnlineTeacher:
    def __init__(self, spec: str, store: TokenStore, kd_cfg: KDConfig, device, chunk_size: int, dtype=torch.float32):
        self.teacher, tokenizer = load_model(spec, dtype=dtype)
        if tokenizer_hash(tokenizer) != store.tokenizer_hash:
            raise PredistillError(f"online teacher {spec} has tokenizer {tokenizer_hash(tokenizer)[:12]}, but the store "
                                  f"was made with {store.tokenizer_hash[:12]}: KD needs one shared vocabulary")
        self.teacher.to(device).eval().requires_grad_(False)
        self.body = model_body(self.teacher)
        self.weight = head_weight(self.teacher, store.vocab_size)  # padded rows are not tokens
        self.kd_cfg = kd_cfg
        self.chunk_size = chunk_size
        self.flops_per_token = forward_flops_per_token(self.teacher, store.vocab_size)
        self.lengths = store.lengths
        self.eos_id = store.eos_id

    def batch(self, ids, inputs: torch.Tensor):
        return None

    def losses(self, hidden, weight, inputs, targets, mask, kd_batch, alpha):
        with torch.no_grad():
            teacher_hidden = self.body(input_ids=inputs).last_hidden_state
        return fused_online_lm_kd_loss(hidden, weight, teacher_hidden, self.weight, targets, self.kd_cfg, mask,
                                       weights=(1 - alpha, alpha))


class MiniLLM(OnlineTeacher):
    """MiniLLM (Gu et al. 2024) as MiniPLM adapts it to pre-training, in its simplest faithful form:
    the student continues each instance's first `prefix_len` tokens by sampling (temperature 1,
    full vocabulary), and L_kd is the reverse KL KL(q_S ‖ p_T) over the full vocabulary at every
    generated position, with gradient through q_S — MiniLLM's single-step term of the policy
    gradient. Simplifications (stated in docs/train.md): no long-horizon reward term, no
    teacher-mixed sampling, no length normalisation. Samples are seeded by (seed, instance ids), so a
    run is deterministic and resumes exactly. Instances with ≤ prefix_len tokens get no KD term.
    """

    def __init__(self, spec: str, store: TokenStore, kd_cfg: KDConfig, device, chunk_size: int, student, seed: int,
                 prefix_len: int, dtype=torch.float32):
        if kd_cfg.loss != "rkl":
            raise PredistillError(f"MiniLLM optimises the reverse KL; use --kd-loss rkl (got {kd_cfg.loss})")
        super().__init__(spec, store, kd_cfg, device, chunk_size, dtype)
        self.student = student
        self.seed = seed
        self.prefix_len = prefix_len
        student_fpt = forward_flops_per_token(student, store.vocab_size)
        # ids the student's head has rows for but the tokenizer does not (padding): never sampled
        rows = student.get_output_embeddings().weight.shape[0]
        self.suppress = list(range(store.vocab_size, rows)) or None
        # per trained corpus token: the student samples the continuation (≈ 2·N_s per generated
        # token, upper bound: every token), then trains on the sample (6·N_s) which the teacher
        # scores (2·N_t). The corpus LM loss's 6·N_s is counted by train itself.
        self.flops_per_token = student_fpt + 3 * student_fpt + self.flops_per_token

    @torch.no_grad()
    def batch(self, ids, inputs: torch.Tensor):
        lengths = torch.as_tensor(self.lengths[np.asarray(ids)])
        keep = lengths > self.prefix_len + 1
        if not keep.any():
            return None
        prompts = inputs[keep][:, :self.prefix_len]
        new_tokens = int(min(lengths[keep].max(), inputs.shape[1] + 1)) - self.prefix_len
        was_training = self.student.training
        self.student.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, *map(int, ids))) % (1 << 63))
            samples = self.student.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                            temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                            min_new_tokens=new_tokens, pad_token_id=self.eos_id,
                                            suppress_tokens=self.suppress, use_model_defaults=False)
        self.student.train(was_training)
        return samples

    def losses(self, hidden, weight, inputs, targets, mask, kd_batch, alpha):
        _, lm_pp = lm_loss(hidden, weight, targets, mask, self.chunk_size)
        if kd_batch is None:
            return lm_pp.sum(), lm_pp.new_zeros(()), lm_pp, lm_pp.new_zeros(())
        body = model_body(self.student)
        sample_hidden = body(input_ids=kd_batch[:, :-1]).last_hidden_state
        with torch.no_grad():
            teacher_hidden = self.body(input_ids=kd_batch[:, :-1]).last_hidden_state
        generated = torch.zeros(kd_batch[:, :-1].shape, dtype=torch.bool, device=kd_batch.device)
        generated[:, self.prefix_len - 1:] = True  # positions whose next token the student sampled
        # the corpus LM term and the KD term on the samples are two passes over different rows
        _, kd_sum, _, kd_pp = fused_online_lm_kd_loss(sample_hidden, weight, teacher_hidden, self.weight, None,
                                                      self.kd_cfg, generated, weights=(0.0, 1.0))
        return lm_pp.sum(), kd_sum, lm_pp, kd_pp
