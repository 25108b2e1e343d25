"""Tied embeddings reduced in two parts (pipedap/tied_split.py) against single-process training, in float64.

argv[1]: ``training`` (every path that reads a reduced gradient, each equal to single-process
training to 1e-9, and where the split is used) or ``desync`` (one rank's forward skips the output layer: CommError on every
rank, nothing hangs). The model's vocabulary and width put shard boundaries inside rows.
``--cuda``: model and batches on this rank's GPU (tests/test_gpu.py, one rank through the engine).
"""

import copy
import dataclasses
import functools
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import pipedap as hvd
from pipedap import engine
from pipedap.buckets import default_groups
from pipedap.planner.plan import Group, Plan
from pipedap.planner.profile import OUTPUT_PIECES
from pipedap.planner.schedules import plan_of
from pipedap.tied_lookup import IDS_WAIT_SECONDS

torch.set_default_dtype(torch.float64)
hvd.init()
R, P = hvd.rank(), hvd.size()
B, T, V, D = 3, 5, 101, 6  # samples per rank, tokens per sample, vocabulary, width
DEVICE = torch.device("cuda", hvd.local_rank()) if "--cuda" in sys.argv else torch.device("cpu")
TOL = 1e-9


class OwnLinear(nn.Linear):
    """A linear layer with its own forward: the split taps its gradient through a node hook."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class TinyLM(nn.Module):
    """BERT's shape in small: a lookup, a hidden layer, a decoder (with bias) tied to the lookup. A plain
    ``nn.Linear`` decoder sends its part in pieces as it computes it; ``OwnLinear`` is tapped whole."""

    def __init__(self, decoder=nn.Linear):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.hidden = nn.Linear(D, D)
        self.decoder = decoder(D, V)
        self.decoder.weight = self.emb.weight
        self.use_decoder = True

    def forward(self, tokens):
        h = torch.tanh(self.hidden(self.emb(tokens)))
        if self.use_decoder:
            return self.decoder(h)
        return h @ torch.ones(D, V, device=h.device)  # the output layer skipped: the tied weight gets only the lookup's rows


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, V // 5, (B * P, T), generator=g)  # a fifth of the vocabulary: rows stay sparse
    return tokens.to(DEVICE), torch.randint(0, V, (B * P, T), generator=g).to(DEVICE)


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


def train(what, model, opt, reference, ref_opt, steps, scale=P):
    """``steps`` plain steps of both, then the parameters compared."""
    for step in range(steps):
        opt.zero_grad()
        local_loss(model, step).backward()
        opt.step()
        reference_step(reference, ref_opt, step, scale)
    compare(what, model, reference)


def compare(what, model, reference):
    ours, theirs = model.state_dict(), reference.state_dict()
    for name in theirs:
        diff = (ours[name] - theirs[name]).abs().max().item()
        if not diff <= TOL * (1 + theirs[name].abs().max().item()):  # (NaN differs too)
            sys.exit(f"rank {R}: {what}: {name} differs by {diff:.3g}")


class Ops:
    """Names and bytes of the collectives that ran (a completion listener)."""

    def __init__(self):
        self.seen = []
        engine.add_completion_listener(lambda ops: self.seen.extend((op.name, op.nbytes) for op in ops))


def split_plan(model, gather_in_backward=False) -> Plan:
    """DeAR's plan of a bucket per module, with the embedding (group 0) split; optionally its all-gather
    issued in backward, right behind its rows."""
    named = [(n, p) for n, p in model.named_parameters()]
    groups = [Group(g[0], tuple(g), 8 * sum(dict(named)[n].numel() for n in g)) for g in default_groups(named, 0)]
    dear = plan_of("dear", groups, P)
    if not gather_in_backward:
        return dataclasses.replace(dear, split=(0,))
    return dataclasses.replace(dear, backward=(*dear.backward, (("ag", 0),)), forward=dear.forward[1:], split=(0,))


def deferred_plan(model, merged=False) -> Plan:
    """``split_plan`` with the embedding's all-gather deferred: right after the decoder's, last, as the planner
    puts it ([Note: the lookup served from the shards]); or, ``merged``, in the decoder's submission."""
    plan = split_plan(model)
    last = len(plan.groups) - 1
    forward = [sub for sub in plan.forward if ("ag", 0) not in sub]
    at = next(i for i, sub in enumerate(forward) if ("ag", last) in sub)
    forward[at:at + 1] = [(("ag", 0), *forward[at])] if merged else [forward[at], (("ag", 0),)]
    return dataclasses.replace(plan, forward=tuple(forward), defer=(0,))


class NormSGD(torch.optim.SGD):
    """Each gradient scaled by its own norm first: not element-wise, so its lookups are never served."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(p.grad.norm() + 1)
        return super().step(closure)


def setup(schedule="dear", op=hvd.Average, make_opt=lambda ps: torch.optim.Adam(ps, lr=0.01), plan=split_plan,
          decoder=nn.Linear):
    """The model, its wrapped optimizer (a bucket per module; by default DeAR's plan, split), the reference."""
    torch.manual_seed(0)
    model = TinyLM(decoder).to(DEVICE)
    reference = copy.deepcopy(model)
    opt = hvd.DistributedOptimizer(make_opt(model.parameters()), model=model, schedule=schedule, fusion_bytes=0,
                                   op=op, plan=plan(model) if plan else None)
    return model, opt, reference, make_opt(reference.parameters())


def check_engaged_and_equal(what, plan, decoder=nn.Linear):
    """Every step reduce-scatters the decoder's part early, in pieces, and all-gathers only rows at the end."""
    model, opt, reference, ref_opt = setup(plan=plan, decoder=decoder)
    ops = Ops()
    train(what, model, opt, reference, ref_opt, 4)
    names = [name for name, _ in ops.seen]
    pieces = [f"rs.0.dense.{k}" for k in range(len(opt._pipedap.splits[0].bounds) - 1)]
    if (opt._pipedap.splitting != {0} or len(pieces) != 8 or any(names.count(piece) != 4 for piece in pieces)
            or len([n for n in names if n.startswith("rs.0")]) != 4 * len(pieces)):
        sys.exit(f"rank {R}: {what}: split not engaged: splitting {opt._pipedap.splitting}, ops {sorted(set(names))}")
    param_bytes = model.emb.weight.numel() * 8
    rows_bytes = max(nbytes for name, nbytes in ops.seen if name == "rowvalues.0")
    if rows_bytes > param_bytes * 0.5:
        sys.exit(f"rank {R}: {what}: the rows all-gather moved {rows_bytes} bytes of a {param_bytes}-byte parameter")
    return rows_bytes, param_bytes


class StillRunning:
    """A deferred all-gather's work as if its bytes arrived only as the output layer waits for them: on loopback
    it has usually ended before the output layer starts, which then computes as usual. Here the output layer
    computes its own rows and then every piece of the other ranks' ([Note: the output layer's own rows
    first]); the other ranks' blocks in the bucket hold NaN beyond the bytes waited for (in the order the ring
    delivers them: ranks r-1, r-2, ...) until the group's update, so a piece that read rows it did not wait for
    would spoil the training."""

    def __init__(self, lookup, work):
        self.work, self.buffer, self.shard = work, lookup.split.bucket.buffer, lookup.split.bucket.shard.numel()
        self.gathered = None  # the whole all-gather's output, once the first piece waits

    @classmethod
    def around(cls, lookup):
        gathering, finish, running = lookup.gathering, lookup.finish, []

        def still_running():
            work = gathering()
            running[:] = [] if work is None else [cls(lookup, work)]
            return running[0] if running else None

        def finish_restored():
            if running and running[0].gathered is not None:
                running[0].buffer.copy_(running[0].gathered)
            finish()

        lookup.gathering, lookup.finish = still_running, finish_restored

    def done(self):
        return False

    def wait_delivered(self, op, nbytes):
        if self.gathered is None:
            self.work.wait()
            self.gathered = self.buffer.clone()
        left = nbytes // self.buffer.element_size()
        for k in range(1, P):
            lo = (R - k) % P * self.shard
            block = self.buffer[lo:lo + self.shard]
            n = min(left, self.shard)
            block[:n] = self.gathered[lo:lo + n]
            block[n:] = float("nan")
            left -= n


def check_deferred():
    """The lookup served from the shards: equal to single-process training, with Adam and with SGD (momentum,
    weight decay); where a rank waits for something else first, or the rule is not element-wise, not served."""
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3)  # noqa: E731
    served = {}
    for name, make_opt in (("adam", lambda ps: torch.optim.Adam(ps, lr=0.01)), ("sgd", sgd)):
        model, opt, reference, ref_opt = setup(make_opt=make_opt, plan=deferred_plan)
        lookup, ops = opt._pipedap.lookups.get(0), Ops()
        if lookup is not None:
            StillRunning.around(lookup)
        train(f"deferred, {name}", model, opt, reference, ref_opt, 4)
        names = [n for n, _ in ops.seen]
        if DEVICE.type == "cuda":  # the fetch is built on the engine thread, for host tensors only
            if lookup is not None or opt._pipedap.deferring:
                sys.exit(f"rank {R}: deferred on {DEVICE}")
            continue
        fetched = max(nbytes for n, nbytes in ops.seen if n == "fetchvalues.0")
        # steps 1-3 (the 4th's update is finished by compare()): each output layer computes this rank's rows, then
        # OUTPUT_PIECES pieces of each other rank's block (every block here has more rows than that)
        if (opt._pipedap.deferring != {0} or lookup.served != 3 or lookup.outputs_early != 3
                or lookup.pieces_delivered != 3 * OUTPUT_PIECES * (P - 1)
                or names.count("fetchvalues.0") != 3 or fetched >= model.emb.weight.numel() * 8 * 0.5):
            sys.exit(f"rank {R}: deferred, {name}: deferring {opt._pipedap.deferring}, served "
                     f"{getattr(lookup, 'served', None)} times, output layer early "
                     f"{getattr(lookup, 'outputs_early', None)} times, pieces "
                     f"{getattr(lookup, 'pieces_delivered', None)}, ops {sorted(set(names))}")
        served[name] = fetched
    if DEVICE.type == "cpu":  # a plan with the deferred all-gather merged into the decoder's (the planner's before)
        model, opt, reference, ref_opt = setup(make_opt=sgd, plan=functools.partial(deferred_plan, merged=True))
        train("deferred, merged", model, opt, reference, ref_opt, 3)
        opt.zero_grad()
        local_loss(model, 3).backward()
        opt.step()
        reference_step(reference, ref_opt, 3, P)
        with torch.no_grad():  # an evaluation forward between step() and the next training forward
            model(batch(4)[0])
        compare("deferred, an evaluation forward", model, reference)
        if opt._pipedap.lookups[0].outputs_early != 0:  # its all-gather ended in the decoder's pre-hook's wait
            sys.exit(f"rank {R}: deferred, merged: output layer early {opt._pipedap.lookups[0].outputs_early} times")
    if DEVICE.type == "cuda":
        return served

    model, opt, reference, ref_opt = setup(plan=deferred_plan)
    lookup, started = opt._pipedap.lookups[0], None
    for step in range(4):
        opt.zero_grad()
        local_loss(model, step).backward()
        opt.step()
        reference_step(reference, ref_opt, step, P)
        if step == 1 and R == 0:
            opt.state_dict()  # rank 0 alone waits for the all-gathers before its next forward
        if step == 2:  # every rank waits for a collective: the lookups decline, the engine waits for no ids
            started = time.monotonic()
            hvd.allreduce(torch.ones(1), name="between")
            waited = time.monotonic() - started
            if waited > IDS_WAIT_SECONDS / 2:
                sys.exit(f"rank {R}: an allreduce between step() and the forward took {waited:.1f} s")
    compare("deferred, interrupted", model, reference)
    if lookup.served != (1 if R == 0 else 2):  # served at step 2 (and at 3 on the ranks that did not wait)
        sys.exit(f"rank {R}: deferred, interrupted: served {lookup.served} times")

    model, opt, reference, ref_opt = setup(make_opt=lambda ps: NormSGD(ps, lr=0.05), plan=deferred_plan)
    train("deferred plan, rule not element-wise", model, opt, reference, ref_opt, 3)
    if opt._pipedap.lookups or opt._pipedap.deferring:
        sys.exit(f"rank {R}: a rule that is not element-wise was served from the shards")
    model, opt, reference, ref_opt = setup(make_opt=sgd, plan=deferred_plan)  # (Adam from scratch would magnify
    model.use_decoder = reference.use_decoder = False  # rounding) no decoder: the model's forward hook finishes it
    train("deferred, no decoder", model, opt, reference, ref_opt, 3)
    return served


def check_online_planning():
    """PipeDAP's own plan (split or not, as its timeline says) trains as single-process training; its
    profile had the tie, with the rows the lookup used."""
    model, opt, reference, ref_opt = setup("pipedap", plan=None)
    profiles, online = [], opt._pipedap.online
    online.profile = lambda sigma=0.0, profile_of=online.profile: profiles.append(profile_of(sigma)) or profiles[-1]
    train("pipedap", model, opt, reference, ref_opt, 10)
    (tie,) = profiles[-1].ties
    if ((tie.param, tie.user) != ("emb.weight", "decoder.bias") or not 0 < tie.rows_bytes <= B * T * (D * 8 + 8)
            or tie.pieces != 8 or not tie.early > 0 or not 0 < tie.span < 1):  # the pieces were timed
        sys.exit(f"rank {R}: pipedap: the online planner's tie is {tie}")
    if opt._pipedap.splitting != set(opt._pipedap.plan.split) or opt._pipedap.rows is not None:
        sys.exit(f"rank {R}: pipedap: splitting {opt._pipedap.splitting}, plan {opt._pipedap.plan.split}")
    return opt._pipedap.plan.split


def check_paths():
    """Sum, clipping, synchronize(), no_sync() accumulation, gradients not zeroed, autocast, a step without the
    decoder."""
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3)  # noqa: E731
    model, opt, reference, ref_opt = setup(op=hvd.Sum, make_opt=sgd)
    train("op=Sum", model, opt, reference, ref_opt, 3, scale=1)

    model, opt, reference, ref_opt = setup()
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

    for step in range(3):  # under autocast the decoder is tapped whole (float64 is not cast: the same sums)
        opt.zero_grad()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = local_loss(model, step)
        loss.backward()
        opt.step()
        reference_step(reference, ref_opt, step, P)
    compare("autocast", model, reference)

    model.use_decoder = reference.use_decoder = False  # no decoder: only the rows travel
    train("a step without the decoder", model, opt, reference, ref_opt, 3)


def check_where_it_splits():
    """Where the plan says so and the runtime can: uncompressed, unsharded, one pass."""
    def splitting(plan=split_plan, **options):
        torch.manual_seed(0)
        model = TinyLM().to(DEVICE)
        options = {"fusion_bytes": 0, **options}
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model,
                                       plan=plan(model) if plan else None, **options)
        return opt._pipedap.splitting

    cases = {"dear": splitting(), "DeAR's own plan": splitting(plan=None, schedule="dear"),
             "wfbp": splitting(plan=None, schedule="wfbp"), "fp16": splitting(compression=hvd.Compression.fp16),
             "sharded": splitting(shard_update=True), "two passes": splitting(backward_passes_per_step=2)}
    os.environ["PIPEDAP_TIED_SPLIT"] = "0"
    cases["PIPEDAP_TIED_SPLIT=0"] = splitting()
    del os.environ["PIPEDAP_TIED_SPLIT"]
    if cases.pop("dear") != {0} or any(cases.values()):
        sys.exit(f"rank {R}: split where it should not be, or not where it should: {cases}")


def check_desync():
    model, opt, _, _ = setup()
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
    for what, plan, decoder in (("dear", split_plan, nn.Linear),
                                ("ag in backward", lambda m: split_plan(m, gather_in_backward=True), nn.Linear),
                                ("node hook", split_plan, OwnLinear)):
        rows_bytes, param_bytes = check_engaged_and_equal(what, plan, decoder)
        print(f"rank {R}: {what} OK: the tied weight's rows all-gather moved {rows_bytes} of {param_bytes} bytes")
    print(f"rank {R}: deferred OK: the fetch moved {check_deferred()} bytes")
    print(f"rank {R}: pipedap OK: planned split {check_online_planning()}")
    check_paths()
    check_where_it_splits()
    print(f"rank {R}: paths OK")
else:
    check_desync()
