"""Tied embeddings reduced in two parts (pipedap/tied_split.py) against single-process training, in float64.

argv[1]: ``training`` (every path that reads a reduced gradient, each equal to single-process
training to 1e-9) or ``desync`` (one rank's forward skips the output layer: CommError on every
rank, nothing hangs). The model's vocabulary and width put shard boundaries inside rows.
"""

import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

import pipedap as hvd
from pipedap import engine

torch.set_default_dtype(torch.float64)
hvd.init()
R, P = hvd.rank(), hvd.size()
B, T, V, D = 3, 5, 101, 6  # samples per rank, tokens per sample, vocabulary, width
TOL = 1e-9


class TinyLM(nn.Module):
    """BERT's shape in small: a lookup, a hidden layer, a decoder (with bias) tied to the lookup."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.hidden = nn.Linear(D, D)
        self.decoder = nn.Linear(D, V)
        self.decoder.weight = self.emb.weight
        self.use_decoder = True

    def forward(self, tokens):
        h = torch.tanh(self.hidden(self.emb(tokens)))
        if self.use_decoder:
            return self.decoder(h)
        return h @ torch.ones(D, V)  # the output layer skipped: the tied weight gets only the lookup's rows


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, V // 5, (B * P, T), generator=g)  # a fifth of the vocabulary: rows stay sparse
    return tokens, torch.randint(0, V, (B * P, T), generator=g)


def loss_of(model, tokens, labels):
    return F.cross_entropy(model(tokens).reshape(-1, V), labels.reshape(-1))


def reference_step(model, opt, step, scale, accumulate=False, clip=None):
    """Single process: every rank's shard with its loss divided by ``scale``, then one plain step."""
    if not accumulate:
        opt.zero_grad()
    tokens, labels = batch(step)
    for r in range(P):
        (loss_of(model, tokens[r * B:(r + 1) * B], labels[r * B:(r + 1) * B]) / scale).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


def local_loss(model, step):
    tokens, labels = batch(step)
    return loss_of(model, tokens[R * B:(R + 1) * B], labels[R * B:(R + 1) * B])


def compare(what, model, reference):
    ours, theirs = model.state_dict(), reference.state_dict()
    for name in theirs:
        diff = (ours[name] - theirs[name]).abs().max().item()
        if diff > TOL * (1 + theirs[name].abs().max().item()):
            sys.exit(f"rank {R}: {what}: {name} differs by {diff:.3g}")


class Ops:
    """Names and bytes of the collectives that ran (a completion listener)."""

    def __init__(self):
        self.seen = []
        engine.add_completion_listener(lambda ops: self.seen.extend((op.name, op.nbytes) for op in ops))


def setup(schedule, op=hvd.Average, make_opt=lambda ps: torch.optim.Adam(ps, lr=0.01)):
    torch.manual_seed(0)
    model = TinyLM()
    reference = copy.deepcopy(model)
    opt = hvd.DistributedOptimizer(make_opt(model.parameters()), model=model, schedule=schedule, fusion_bytes=0,
                                   op=op)
    return model, opt, reference, make_opt(reference.parameters())


def tied_bucket(opt) -> int:
    (g,) = [b.index for b in opt._pipedap.buckets if "emb.weight" in b.names]
    return g


def check_engaged_and_equal(schedule):
    """Every step reduce-scatters the decoder's part early and all-gathers only rows at the end."""
    model, opt, reference, ref_opt = setup(schedule)
    g = tied_bucket(opt)
    ops = Ops()
    for step in range(8):
        opt.zero_grad()
        local_loss(model, step).backward()
        opt.step()
        reference_step(reference, ref_opt, step, P)
    compare(f"{schedule}", model, reference)
    names = [name for name, _ in ops.seen]
    measured = 8 if schedule == "dear" else 8 - 6  # pipedap: 1 warm-up + 5 profiled steps under DeAR first
    if g not in opt._pipedap.splitting or names.count(f"rs.{g}.dense") < measured or f"rs.{g}" in names:
        sys.exit(f"rank {R}: {schedule}: split not engaged: splitting {opt._pipedap.splitting}, ops {sorted(set(names))}")
    (tie,) = opt._pipedap._ties()  # what the online planner's profile gets
    if (tie.param, tie.user) != ("emb.weight", "decoder.bias") or not 0 < tie.rows_bytes <= B * T * (D * 8 + 8):
        sys.exit(f"rank {R}: {schedule}: the reducer's tie for the planner is {tie}")
    param_bytes = model.emb.weight.numel() * 8
    rows_bytes = max(nbytes for name, nbytes in ops.seen if name == f"rowvalues.{g}")
    if rows_bytes > param_bytes * 0.5:
        sys.exit(f"rank {R}: {schedule}: the rows all-gather moved {rows_bytes} bytes of a {param_bytes}-byte parameter")
    return rows_bytes, param_bytes


def check_paths():
    """Sum, clipping, synchronize(), no_sync() accumulation, gradients not zeroed, a step without the decoder."""
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3)  # noqa: E731
    model, opt, reference, ref_opt = setup("dear", op=hvd.Sum, make_opt=sgd)
    for step in range(3):
        opt.zero_grad()
        local_loss(model, step).backward()
        opt.step()
        reference_step(reference, ref_opt, step, 1)
    compare("op=Sum", model, reference)

    model, opt, reference, ref_opt = setup("dear")
    for step in range(3):  # clipping reads the reduced shards (reduced_square_sum)
        opt.zero_grad()
        local_loss(model, step).backward()
        hvd.clip_grad_norm_(opt, 0.05)
        opt.step()
        reference_step(reference, ref_opt, step, P, clip=0.05)
    compare("clip_grad_norm_", model, reference)

    for step in range(3):  # synchronize() completes p.grad before step()
        opt.zero_grad()
        local_loss(model, step).backward()
        opt.synchronize()
        reference_step(reference, ref_opt, step, P)
        if not torch.allclose(model.emb.weight.grad, reference.emb.weight.grad, atol=TOL):
            sys.exit(f"rank {R}: synchronize(): the tied gradient differs from the reference's")
        with opt.skip_synchronize():
            opt.step()
    compare("synchronize()", model, reference)

    for step in range(3):  # a micro-batch under no_sync(), then a synced one: their sum is reduced
        opt.zero_grad()
        with opt.no_sync():
            local_loss(model, 2 * step).backward()
        local_loss(model, 2 * step + 1).backward()
        opt.step()
        ref_opt.zero_grad()
        for s in (2 * step, 2 * step + 1):
            tokens, labels = batch(s)
            for r in range(P):
                (loss_of(reference, tokens[r * B:(r + 1) * B], labels[r * B:(r + 1) * B]) / P).backward()
        ref_opt.step()
    compare("no_sync()", model, reference)

    for step in range(3):  # no zero_grad(): the new gradient adds to the last reduced one, in both
        local_loss(model, step).backward()
        opt.step()
        reference_step(reference, ref_opt, step, P, accumulate=True)
    compare("gradients not zeroed", model, reference)

    for step in range(3):  # a forward whose graph never runs backward (its tap never fires), then the real one
        opt.zero_grad()
        local_loss(model, step + 10)
        local_loss(model, step).backward()
        opt.step()
        reference_step(reference, ref_opt, step, P)
    compare("a forward without backward", model, reference)

    model.use_decoder = reference.use_decoder = False  # no decoder: only the rows travel
    for step in range(3):
        opt.zero_grad()
        local_loss(model, step).backward()
        opt.step()
        reference_step(reference, ref_opt, step, P)
    compare("a step without the decoder", model, reference)


def check_desync():
    model, opt, _, _ = setup("dear")
    model.use_decoder = R != 0
    try:
        for step in range(3):
            opt.zero_grad()
            local_loss(model, step).backward()
            opt.step()
            opt.synchronize()
    except hvd.CommError as error:
        print(f"rank {R}: desync raised CommError: {str(error).splitlines()[0]}")
        return
    sys.exit(f"rank {R}: desync NOT DETECTED")


if sys.argv[1] == "training":
    for schedule in ("dear", "pipedap"):
        rows_bytes, param_bytes = check_engaged_and_equal(schedule)
        print(f"rank {R}: {schedule} OK: the tied weight's rows all-gather moved {rows_bytes} of {param_bytes} bytes")
    check_paths()
    print(f"rank {R}: paths OK")
else:
    check_desync()
