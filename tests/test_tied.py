"""Tied embeddings split in two parts (pipedap/tied_embeddings.py, pipedap/tied_split.py): which buckets qualify, and the tap on autograd's graph.
Training against single-process training over MPI: tests/test_tied_mpi.py."""

import functools

import pytest
import torch

from models.bert import bert_base
from models.gpt2 import gpt2
from pipedap.buckets import build_bucket
from pipedap.planner.profile import Tie
from pipedap.profiler import profile_model
from pipedap.tied_embeddings import lookup_ties
from pipedap.tied_split import TiedSplit, _feeding_edges

TINY_BERT = dict(vocab_size=97, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                 max_position_embeddings=16)


def buckets_of(model, groups):
    named = dict(model.named_parameters())
    return [build_bucket(i, [(n, named[n]) for n in names], 2, 0) for i, names in enumerate(groups)]


@pytest.mark.parametrize("make, tied_name, user", [
    (lambda: bert_base(**TINY_BERT), "bert.embeddings.word_embeddings.weight", "cls.predictions.decoder"),
    (lambda: gpt2(vocab_size=97, n_positions=16, n_embd=16, n_layer=1, n_head=2), "transformer.wte.weight", "lm_head"),
])
def test_a_word_embedding_tied_to_an_output_layer_qualifies_when_alone_in_its_bucket(make, tied_name, user):
    torch.manual_seed(0)
    model = make()
    names = [n for n, _ in model.named_parameters()]
    others = [n for n in names if n != tied_name]
    alone = lookup_ties(model, buckets_of(model, [[tied_name], others]))
    assert list(alone) == [0]
    embedding, users = alone[0]
    assert isinstance(embedding, torch.nn.Embedding)
    assert users == [model.get_submodule(user)]
    shared = lookup_ties(model, buckets_of(model, [[tied_name, others[0]], others[1:]]))
    assert shared == {}  # with another parameter in its bucket it is reduced whole


def test_an_untied_embedding_does_not_qualify():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    assert lookup_ties(model, buckets_of(model, [["0.weight"], ["1.weight", "1.bias"]])) == {}


def loss_of(output) -> torch.Tensor:
    return sum(out.square().sum() for out in output) if isinstance(output, tuple) else output.square().sum()


@pytest.mark.parametrize("make, weight_of, decoder_of", [
    (lambda: bert_base(**TINY_BERT), lambda m: m.bert.embeddings.word_embeddings.weight,
     lambda m: m.cls.predictions.decoder),
    (lambda: gpt2(vocab_size=97, n_positions=16, n_embd=16, n_layer=1, n_head=2), lambda m: m.transformer.wte.weight,
     lambda m: m.lm_head),  # a head without a bias
])
def test_the_tap_takes_the_decoders_part_and_leaves_the_lookups_rows(make, weight_of, decoder_of):
    """Hooked as the reducer hooks it, the decoder's contribution arrives at the node hook, and the
    parameter's .grad gets only the rows of the batch's tokens; the two add up to the whole gradient."""
    torch.manual_seed(0)
    model = make().eval()  # no dropout: the two runs compute the same
    weight, decoder = weight_of(model), decoder_of(model)
    ids = torch.randint(0, 20, (2, 8))
    loss_of(model(ids)).backward()
    whole = weight.grad.clone()
    weight.grad = None

    taken = []

    def take(slot, grad_inputs, grad_outputs):
        taken.append(grad_inputs[slot].clone())
        return tuple(None if i == slot else g for i, g in enumerate(grad_inputs))

    def tap(module, args, output):
        accumulator = weight.view_as(weight).grad_fn.next_functions[0][0]
        stop = {a.grad_fn for a in args if a.grad_fn is not None}
        for node, slot in _feeding_edges([output], stop, accumulator):
            node.register_hook(functools.partial(take, slot))

    handle = decoder.register_forward_hook(tap)
    loss_of(model(ids)).backward()
    handle.remove()
    assert len(taken) == 1
    rows = weight.grad.ne(0).any(dim=1).nonzero().squeeze(1)
    assert set(rows.tolist()) <= set(ids.unique().tolist())
    torch.testing.assert_close(taken[0].reshape(weight.shape) + weight.grad, whole)
    assert taken[0].ne(0).any(dim=1).sum() > len(rows)  # the decoder's part is dense


def test_the_profiler_records_the_tie_with_the_rows_a_batch_looks_up():
    torch.manual_seed(0)
    model = bert_base(**TINY_BERT)
    ids = torch.randint(0, 20, (2, 8))
    profile = profile_model(model, ids, None, lambda out, _: sum(o.square().sum() for o in out), warmup=0,
                            iterations=1)
    rows = ids.unique().numel()
    (tie,) = profile.ties  # (the decoder's pieces timed, its lookup servable with the profiler's SGD)
    assert tie == Tie("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.bias",
                      rows * (16 * 4 + 8), tie.early, tie.span, 8, True) and tie.span > 0
    assert not model.bert.embeddings.word_embeddings._forward_hooks  # the counter is gone
    assert "forward" not in vars(model.cls.predictions.decoder)  # and the timer


def test_where_the_plan_does_not_split_a_linear_decoder_gives_autograds_gradient_in_timed_pieces():
    """[Note: the dense part in pieces]: not taken, the decoder's weight gradient goes to autograd whole (the
    same as without the split), and the online planner hears when its first and last pieces were ready."""
    torch.manual_seed(0)
    model = bert_base(**TINY_BERT).eval()
    ids = torch.randint(0, 20, (2, 8))
    loss_of(model(ids)).backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    tied = "bert.embeddings.word_embeddings.weight"
    buckets = buckets_of(model, [[tied], [n for n, _ in model.named_parameters() if n != tied]])
    ((_, users),) = lookup_ties(model, buckets).values()
    heard = []
    TiedSplit(buckets[0], users, op=None, process_set=None, tapping=lambda: False, lock=None,
              on_pieces=lambda first, last: heard.append((first, last)))
    assert isinstance(model.cls.predictions.decoder.forward, functools.partial)  # it computes in pieces
    loss_of(model(ids)).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], msg=name)
    assert len(heard) == 1 and heard[0][0] <= heard[0][1]
    with torch.no_grad():  # without autograd, the plain layer
        assert model(ids)[0].grad_fn is None


def test_under_autocast_a_linear_decoder_runs_autocasts_linear():
    """Autocast computes the decoder in bfloat16 and casts its gradient back: the split leaves it to
    autograd (and would tap it whole), so training under autocast works and computes what it did."""
    torch.manual_seed(0)
    model = bert_base(**TINY_BERT).eval()
    ids = torch.randint(0, 20, (2, 8))

    def gradients():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(ids)
        loss_of(tuple(o.float() for o in output)).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    tied = "bert.embeddings.word_embeddings.weight"
    buckets = buckets_of(model, [[tied], [n for n, _ in model.named_parameters() if n != tied]])
    ((_, users),) = lookup_ties(model, buckets).values()
    TiedSplit(buckets[0], users, op=None, process_set=None, tapping=lambda: False, lock=None)
    split = gradients()
    for name, grad in plain.items():
        torch.testing.assert_close(split[name], grad, msg=name)
