"""The Chrome trace of pipedap.tools.bench --timeline, the Recorder, and python -m pipedap.tools.timeline."""

import json
from types import SimpleNamespace

import pytest
from mpi_launch import assert_ok, run_mpi

from pipedap.planner.plan import Plan
from pipedap.tools import timeline


def op(name: str, enqueue: int, start: int, end: int) -> SimpleNamespace:
    kind = {"rs": "reducescatter", "ag": "allgather", "ar": "allreduce"}[name.split(".")[0]]
    return SimpleNamespace(name=name, kind=kind, nbytes=1024, group_size=1, enqueue_ns=enqueue, start_ns=start,
                           end_ns=end)


def test_recorder_keeps_phases_and_the_ops_enqueued_while_recording():
    rec = timeline.Recorder()
    with rec.phase("forward"):  # not recording yet: not kept
        pass
    rec.start()
    origin = rec.origin_ns
    rec.next_batch()
    with rec.phase("backward"):
        pass
    rec.on_ops([op("rs.1", origin - 5_000, origin + 1_000, origin + 3_000),  # enqueued before: an untimed batch's
                op("rs.0", origin + 2_000, origin + 3_000, origin + 7_000)])
    rec.stop()
    rec.on_ops([op("ag.0", origin + 8_000, origin + 9_000, origin + 10_000)])  # after stop: not kept
    events = rec.events(rank=3)
    slices = [e for e in events if e["ph"] == "X"]
    assert [(e["name"], e["cat"], e["pid"]) for e in slices] == [("backward", "compute", 3), ("rs.0", "comm", 3)]
    comm = slices[1]
    assert (comm["ts"], comm["dur"], comm["tid"]) == (3.0, 4.0, timeline.COMM_TID)
    assert comm["args"] == {"kind": "reducescatter", "nbytes": 1024, "group_size": 1, "enqueue_us": 2.0,
                            "queued_us": 1.0}
    assert slices[0]["args"] == {"batch": 0}


def test_predicted_events_repeat_the_plan_from_each_backward_start():
    plan = Plan.from_json({
        "version": 1, "schedule": "optimal", "world_size": 2, "sync_before_forward": False,
        "groups": [{"index": 0, "name": "a", "nbytes": 8, "params": ["a.w"]},
                   {"index": 1, "name": "b", "nbytes": 8, "params": ["b.w"]}],
        "backward": [{"ops": [["rs", 1]], "start": 0.001, "end": 0.002},
                     {"ops": [["rs", 0], ["ag", 1]], "start": 0.003, "end": 0.005}],
        "forward": [{"ops": [["ag", 0]], "start": 0.006, "end": 0.007}],
        "predicted": {"iteration_time": 0.01, "lower_bound": 0.009}})
    events = timeline.predicted_events(plan, [100.0, 20_100.0], pid=2)
    link = [(e["name"], e["ts"], e["dur"]) for e in events if e.get("tid") == timeline.COMM_TID and e["ph"] == "X"]
    assert [name for name, _, _ in link] == ["RS1", "RS0+AG1", "AG0"] * 2
    assert link[1][1:] == pytest.approx((3100.0, 2000.0)) and link[4][1] == pytest.approx(23_100.0)
    assert timeline.predicted_events(Plan.from_json({**plan.to_dict(), "predicted": None}), [0.0], pid=2) == []


@pytest.mark.mpi
def test_bench_trace_has_one_event_per_collective_and_the_prediction(tmp_path):
    trace, plan_file, out = tmp_path / "trace.json", tmp_path / "plan.json", tmp_path / "result.json"
    batches = 3
    result = run_mpi("bench_main.py", 2, "--model", "resnet50", "--image-size", "32", "--batch-size", "2",
                     "--num-warmup-batches", "1", "--num-batches-per-iter", "1", "--num-iters", str(batches),
                     "--baseline", "PipeDAP", "--bandwidth", "1gbit", "--no-progress", "--timeline", str(trace),
                     "--save-plan", str(plan_file), "--json", str(out), timeout=240)
    assert_ok(result)
    plan = Plan.load(plan_file)
    doc = json.loads(trace.read_text())  # valid JSON
    events = doc["traceEvents"]
    ops_per_batch = sorted(f"{kind}.{g}" for sub in (*plan.backward, *plan.forward) for kind, g in sub)
    for rank in (0, 1):
        comm = sorted(e["name"] for e in events if e.get("cat") == "comm" and e["pid"] == rank)
        assert comm == sorted(ops_per_batch * batches)  # every op of every timed batch, once
        for e in events:
            if e.get("cat") == "comm" and e["pid"] == rank:
                assert e["dur"] >= 0 and e["args"]["enqueue_us"] <= e["ts"]
        phases = [e["name"] for e in events if e.get("cat") == "compute" and e["pid"] == rank]
        assert phases == ["forward", "backward", "step"] * batches
    predicted = [e for e in events if e.get("cat") == "predicted" and e["tid"] == timeline.COMM_TID]
    assert len(predicted) == batches * (len(plan.backward) + len(plan.forward)) and {e["pid"] for e in predicted} == {2}
    assert doc["otherData"]["predicted_iteration_s"] == pytest.approx(plan.predicted.iteration_time)
    assert json.loads(out.read_text())["timeline"] == str(trace)

    png = tmp_path / "chart.png"
    first = min(e["args"]["batch"] for e in events if e.get("cat") == "compute" and e["pid"] == 0)
    # batches are counted from the run's first, warm-up included (it lasts until memory is warm: 1 or more)
    assert timeline.main([str(trace), "--out", str(png), "--batch", str(first)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.mpi
@pytest.mark.parametrize("baseline, extra", [("DeAR", ("--bandwidth", "1gbit")), ("WFBP", ())])
def test_a_plan_without_prediction_is_simulated_for_the_predicted_lane(tmp_path, baseline, extra):
    trace, out = tmp_path / "trace.json", tmp_path / "result.json"
    batches = 2
    result = run_mpi("bench_main.py", 2, "--model", "resnet50", "--image-size", "32", "--batch-size", "2",
                     "--num-warmup-batches", "1", "--num-batches-per-iter", "1", "--num-iters", str(batches),
                     "--baseline", baseline, "--no-progress", "--timeline", str(trace), "--json", str(out),
                     *extra, env={"PIPEDAP_CACHE_DIR": str(tmp_path / "cache")}, timeout=240)
    assert_ok(result)
    doc, events = json.loads(out.read_text()), json.loads(trace.read_text())["traceEvents"]
    predicted = [e for e in events if e.get("cat") == "predicted" and e["tid"] == timeline.COMM_TID]
    measured = [e for e in events if e.get("cat") == "comm" and e["pid"] == 0]
    assert len(predicted) == len(measured) > 0  # one predicted submission per collective: neither merges any
    kinds = {"DeAR": {"RS", "AG"}, "WFBP": {"AR"}}[baseline]
    assert {e["name"].rstrip("0123456789") for e in predicted} == kinds
    assert doc["plan"]["predicted_iteration_s"] > 0 and doc["batch_time"]["predicted_s"] > 0
    assert doc["planning"]["cost_source"].startswith("assumed ring on 1gbit" if extra else "measured on this cluster")
    assert "predicted by the plan" in result.output


def test_the_chart_names_every_colour_and_the_predicted_end(tmp_path, legend_of):
    def slice_(name, cat, pid, tid, ts, dur, **args):
        return {"name": name, "cat": cat, "ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "args": args}

    events = [slice_("backward", "compute", 0, 0, 0, 100, batch=0), slice_("forward", "compute", 0, 0, 150, 50, batch=1),
              slice_("rs.0", "comm", 0, 1, 10, 40, kind="reducescatter"),
              slice_("ag.0", "comm", 0, 1, 120, 20, kind="allgather"),
              slice_("iteration (predicted)", "predicted", 1, 0, 0, 190, batch=0),
              slice_("RS0+AG1", "predicted", 1, 1, 20, 30, batch=0)]
    doc = {"traceEvents": events, "otherData": {"measured_iteration_s": 2e-4, "predicted_iteration_s": 1.9e-4}}
    labels = legend_of(lambda: timeline.draw(doc, tmp_path / "chart.png", batch=0))
    assert labels == ["forward (F)", "backward (B)", "reduce-scatter (RS)", "all-gather (AG)",
                      "ops sent as one submission (RS+AG)",
                      "predicted iteration (backward start to next forward end)", "predicted end of the batch"]


def test_collectives_of_one_submission_make_one_block_labelled_by_those_that_carry_data():
    def comm(name, kind, ts, nbytes):
        return {"name": name, "cat": "comm", "ph": "X", "pid": 0, "tid": 1, "ts": ts, "dur": 5,
                "args": {"kind": kind, "nbytes": nbytes}}

    events = [comm("rs.3", "reducescatter", 0, 4000), comm("used.3", "allreduce", 0, 8),  # a bucket's flags
              comm("rs.2", "reducescatter", 10, 4000), comm("ag.4", "allgather", 10, 2000),  # merged
              comm("ar.1", "allreduce", 20, 16)]
    assert [label for _, label in timeline._blocks(events)] == ["RS3", "RS2+AG4", "AR1"]


def test_timeline_cli_rejects_what_is_not_a_trace(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"events": []}')
    assert timeline.main([str(bad)]) == 2
    assert "no 'traceEvents' list" in capsys.readouterr().err


def test_link_use_finds_each_batchs_busy_time_and_longest_idle_stretch(tmp_path, capsys):
    """Two complete batches on one rank (times in µs): overlapping collectives count once, and
    the idle stretch is named by the collectives around it; the last forward only closes batch 1."""
    def phase(name, batch, ts, dur):
        return {"name": name, "cat": "compute", "ph": "X", "pid": 0, "tid": 0, "ts": ts, "dur": dur,
                "args": {"batch": batch}}

    def comm(name, kind, ts, dur):
        return {"name": name, "cat": "comm", "ph": "X", "pid": 0, "tid": 1, "ts": ts, "dur": dur,
                "args": {"kind": kind, "nbytes": 100}}

    events = [phase("forward", 0, 0, 2e6), phase("backward", 0, 2e6, 3e6),
              comm("ag.0", "allgather", 0, 1e6),  # then idle 1..3.5 s: the longest
              comm("rs.1", "reducescatter", 3.5e6, 1e6), comm("rs.0", "reducescatter", 4e6, 1e6),  # overlap
              phase("forward", 1, 5e6, 2e6), phase("backward", 1, 7e6, 3e6),
              comm("ag.0", "allgather", 5e6, 1.5e6), comm("rs.1", "reducescatter", 8e6, 1e6),
              phase("forward", 2, 10e6, 2e6)]
    first, second = timeline.link_use({"traceEvents": events})
    assert (first.batch, first.seconds, first.phases) == (0, 5.0, {"forward": 2.0, "backward": 3.0})
    assert first.busy == pytest.approx(2.5)
    assert (first.idle, first.idle_from, first.idle_after, first.idle_before) == (2.5, 1.0, "AG0", "RS1")
    assert second.busy == pytest.approx(2.5)
    assert (second.idle, second.idle_from, second.idle_after, second.idle_before) == (1.5, 1.5, "AG0", "RS1")  # from the batch's start
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    assert timeline.main([str(trace), "--link"]) == 0
    out = capsys.readouterr().out
    assert "rank 0 batch 0: 5.00 s (forward 2.00, backward 3.00); link busy 2.50 s (50%); longest idle 2.50 s" in out
    # the mean leaves out the first batch, which the bench starts with a drained link
    assert "mean of the batches after each rank's first: link busy 50% of the time, longest idle 1.50 s per batch" in out
    trace.write_text(json.dumps({"traceEvents": events[:3]}))  # one forward: no batch is complete
    assert timeline.main([str(trace), "--link"]) == 2
    assert "no complete batch" in capsys.readouterr().err
