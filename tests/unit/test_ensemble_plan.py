"""Ensemble planning: the step graph's checks, the step models' checks, and per-request pruning."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from server.errors import InvalidArgument, ModelLoadError
from server.model_config import ModelConfig, ModelSpec, build_spec
from server.scheduler.ensemble_plan import EnsemblePlan, Step, parse_steps, plan_ensemble, step_dependencies

WHERE = "repo/ens/config.pbtxt"


def cfg(text: str) -> ModelConfig:
    return text_format.Parse(text, ModelConfig())


def tensor(kind: str, name: str, dtype: str = "TYPE_FP32", dims: tuple[int, ...] = (3,), extra: str = "") -> str:
    return f'{kind} {{ name: "{name}" data_type: {dtype} dims: [{", ".join(map(str, dims))}] {extra} }}\n'


def model(name: str, inputs: list[str], outputs: list[str], mbs: int = 0, **dtypes_dims) -> ModelSpec:
    """A step model whose every tensor is FP32 [3] unless `dtypes_dims[tensor] = (dtype, dims[, extra])`."""
    text = f'name: "{name}" backend: "onnxruntime" max_batch_size: {mbs}\n'
    for kind, names in (("input", inputs), ("output", outputs)):
        for n in names:
            text += tensor(kind, n, *dtypes_dims.get(n, ()))
    return build_spec(cfg(text), "onnxruntime", (), f"repo/{name}/config.pbtxt")


def step(model_name: str, inputs: dict[str, str], outputs: dict[str, str], version: int = -1) -> str:
    maps = "".join(f'input_map {{ key: "{k}" value: "{v}" }} ' for k, v in inputs.items())
    maps += "".join(f'output_map {{ key: "{k}" value: "{v}" }} ' for k, v in outputs.items())
    return f'step {{ model_name: "{model_name}" model_version: {version} {maps}}}\n'


def ensemble(inputs: list[str], outputs: list[str], steps: list[str], mbs: int = 0, tail: str = "",
             **dd) -> ModelConfig:
    text = f'name: "ens" platform: "ensemble" max_batch_size: {mbs}\n'
    text += "".join(tensor("input", n, *dd.get(n, ())) for n in inputs)
    text += "".join(tensor("output", n, *dd.get(n, ())) for n in outputs)
    return cfg(text + "ensemble_scheduling {\n" + "".join(steps) + "}\n" + tail)


def load_error(config: ModelConfig, specs: dict[int, ModelSpec] | None = None) -> str:
    with pytest.raises(ModelLoadError) as e:
        if specs is None:
            parse_steps(config, WHERE)
        else:
            plan_ensemble(config, specs, WHERE)
    assert e.value.message.startswith(WHERE + ": "), e.value.message
    return e.value.message


# A chain given out of order: step 0 = post, step 1 = pre, step 2 = mid.
CHAIN = ensemble(["RAW"], ["SCORE"], [
    step("post", {"x": "t2"}, {"y": "SCORE"}),
    step("pre", {"x": "RAW"}, {"y": "t1"}),
    step("mid", {"x": "t1"}, {"y": "t2"}, version=2),
])
CHAIN_SPECS = {0: model("post", ["x"], ["y"]), 1: model("pre", ["x"], ["y"]), 2: model("mid", ["x"], ["y"])}


def test_chain_is_ordered_by_data_flow():
    plan = plan_ensemble(CHAIN, CHAIN_SPECS, WHERE)
    assert [s.model_name for s in plan.steps] == ["pre", "mid", "post"]
    assert plan.steps[0] == Step(1, "pre", -1, {"x": "RAW"}, {"y": "t1"})
    assert plan.producer == {"t1": 1, "t2": 2, "SCORE": 0}
    assert plan.consumers["RAW"] == (1,) and plan.consumers["t1"] == (2,) and plan.consumers["SCORE"] == ()
    assert plan.upstream == {1: frozenset(), 2: frozenset({1}), 0: frozenset({2})}
    assert plan.step_at[2].model_version == 2 and plan.inputs == ("RAW",) and plan.outputs == ("SCORE",)
    sched = plan.schedule([])
    assert sched.steps == plan.steps and sched.outputs == {"SCORE"}
    assert sched.uses == {"RAW": 1, "t1": 1, "t2": 1, "SCORE": 1}
    assert sched.release_after == {1: ("RAW",), 2: ("t1",), 0: ("t2",)}
    assert hash(plan.steps[0]) == hash(Step(1, "pre", -1, {}, {}))


def test_step_dependencies_in_step_order_once_each():
    config = ensemble(["A"], ["B"], [step("m", {"x": "A"}, {"y": "t"}), step("n", {"x": "t"}, {"y": "u"}, 3),
                                     step("m", {"x": "u"}, {"y": "B"})])
    assert step_dependencies(config) == (("m", -1), ("n", 3))
    assert step_dependencies(CHAIN) == (("post", -1), ("pre", -1), ("mid", 2))


# pre: IN -> P;  left: P -> L;  right: P -> R;  join: L, R -> OUT.  L is also an ensemble output.
DIAMOND = ensemble(["IN"], ["OUT", "L"], [
    step("join", {"a": "L", "b": "R"}, {"y": "OUT"}),
    step("left", {"x": "P"}, {"y": "L"}),
    step("right", {"x": "P"}, {"y": "R"}),
    step("pre", {"x": "IN"}, {"y": "P"}),
], mbs=8)
DIAMOND_SPECS = {0: model("join", ["a", "b"], ["y"], 8), 1: model("left", ["x"], ["y"], 8),
                 2: model("right", ["x"], ["y"], 16), 3: model("pre", ["x"], ["y"], 8)}


def names(steps: tuple[Step, ...]) -> list[str]:
    return [s.model_name for s in steps]


def test_diamond():
    plan = plan_ensemble(DIAMOND, DIAMOND_SPECS, WHERE)
    assert names(plan.steps) == ["pre", "left", "right", "join"]
    assert plan.consumers["P"] == (1, 2) and plan.upstream[0] == {1, 2}
    assert names(plan.steps_for(["OUT", "L"])) == ["pre", "left", "right", "join"]
    sched = plan.schedule(["OUT"])
    assert sched.uses["P"] == 2 and sched.uses["L"] == 1
    assert sched.release_after == {3: ("IN",), 1: (), 2: ("P",), 0: ("L", "R")}


def test_steps_for_an_intermediate_that_is_also_an_output():
    plan = plan_ensemble(DIAMOND, DIAMOND_SPECS, WHERE)
    assert names(plan.steps_for(["L"])) == ["pre", "left"]
    both = plan.schedule(["L", "OUT"])
    assert both.uses["L"] == 2  # join reads it and the response returns it
    assert "L" not in {t for ts in both.release_after.values() for t in ts}
    assert names(plan.steps_for(["OUT"])) == ["pre", "left", "right", "join"]


def test_steps_for_is_cached_and_checks_names():
    plan = plan_ensemble(DIAMOND, DIAMOND_SPECS, WHERE)
    assert plan.schedule(["OUT", "L"]) is plan.schedule(("L", "OUT")) is plan.schedule([])
    with pytest.raises(InvalidArgument, match="unexpected inference output 'P' for model 'ens'"):
        plan.steps_for(["P"])


def test_pruning_drops_unneeded_outputs_and_inputs():
    # a: X -> (t, SIDE); b: t -> MAIN; c: Y -> OTHER.  Asking for MAIN skips c and frees SIDE at once.
    config = ensemble(["X", "Y"], ["MAIN", "SIDE", "OTHER"], [
        step("a", {"x": "X"}, {"y": "t", "z": "SIDE"}), step("b", {"x": "t"}, {"y": "MAIN"}),
        step("c", {"x": "Y"}, {"y": "OTHER"})])
    plan = plan_ensemble(config, {0: model("a", ["x"], ["y", "z"]), 1: model("b", ["x"], ["y"]),
                                  2: model("c", ["x"], ["y"])}, WHERE)
    sched = plan.schedule(["MAIN"])
    assert names(sched.steps) == ["a", "b"] and sched.unread_inputs == {"Y"}
    assert sched.release_after == {0: ("SIDE", "X"), 1: ("t",)}


def test_a_valid_plan_is_an_ensemble_plan():
    assert isinstance(plan_ensemble(CHAIN, CHAIN_SPECS, WHERE), EnsemblePlan)


# ---- parse_steps: checks that need no step model ----

def ok_step(**kw) -> str:
    return step("m", {"x": "IN"}, {"y": "OUT"}, **kw)


@pytest.mark.parametrize(("config", "expect"), [
    (cfg('name: "ens" platform: "ensemble" ' + tensor("input", "IN") + tensor("output", "OUT")),
     "ensemble_scheduling has no step"),
    (ensemble(["IN"], ["OUT"], ['step { model_version: -1 input_map { key: "x" value: "IN" } }']),
     "step 0 has no model_name"),
    (ensemble(["IN"], ["OUT"], [ok_step(), 'step { model_name: "b" model_version: -1 '
                                           'output_map { key: "y" value: "OUT2" } }']),
     "step 1 (model 'b') has an empty input_map"),
    (ensemble(["IN"], ["OUT"], ['step { model_name: "a" model_version: -1 input_map { key: "x" value: "IN" } }']),
     "step 0 (model 'a') has an empty output_map"),
    (ensemble(["IN"], ["OUT"], [ok_step(version=0)]), "step 0 (model 'm') has model_version 0"),
    (ensemble(["IN"], ["OUT"], [step("ens", {"x": "IN"}, {"y": "OUT"})]), "step 0 (model 'ens') is the ensemble"),
    (ensemble(["IN"], ["OUT"], [step("m", {"x": ""}, {"y": "OUT"})]),
     "step 0 (model 'm') input_map has an empty name in 'x' -> ''"),
    (ensemble(["IN"], ["OUT"], [ok_step(), step("b", {"x": "IN"}, {"z": "OUT"})]),
     "ensemble tensor 'OUT' is written by both step 0 (model 'm') output 'y' and step 1 (model 'b') output 'z'"),
    (ensemble(["IN"], ["OUT"], [step("m", {"x": "IN"}, {"y": "OUT", "z": "OUT"})]),
     "ensemble tensor 'OUT' is written by both step 0 (model 'm') output 'y' and step 0 (model 'm') output 'z'"),
    (ensemble(["IN"], ["OUT"], [ok_step(), step("b", {"x": "OUT"}, {"y": "IN"})]),
     "step 1 (model 'b') output 'y' writes ensemble tensor 'IN', which is an ensemble input"),
    (ensemble(["IN"], ["OUT", "EXTRA"], [ok_step()]), "ensemble output 'EXTRA' is not written by any step"),
    (ensemble(["IN"], ["OUT"], [step("m", {"x": "IN", "w": "ghost"}, {"y": "OUT"})]),
     "step 0 (model 'm') input 'w' reads ensemble tensor 'ghost', which is neither an ensemble input nor written"),
    (ensemble(["IN", "UNUSED"], ["OUT"], [ok_step()]), "ensemble input 'UNUSED' is not read by any step"),
    (ensemble(["IN"], ["OUT"], [step("m", {"x": "IN"}, {"y": "OUT", "z": "spare"})]),
     "ensemble tensor 'spare' written by step 0 (model 'm') output 'z' is neither read by a step nor an ensemble "
     "output"),
    (ensemble(["IN"], ["OUT"], [ok_step()], tail='instance_group { count: 2 }'),
     "instance_group cannot be set for an ensemble"),
    (ensemble(["IN"], ["OUT"], [ok_step()], tail='backend: "python"'), "platform 'ensemble' and no backend"),
    (ensemble(["IN", "OUT"], ["OUT"], [ok_step()]), "'OUT' is both an ensemble input and an ensemble output"),
])
def test_parse_errors(config, expect):
    assert expect in load_error(config)


def test_cycle_names_its_steps_and_tensors():
    config = ensemble(["IN"], ["OUT"], [
        step("a", {"x": "IN"}, {"y": "t0"}),
        step("b", {"x": "t0", "w": "t2"}, {"y": "t1"}),
        step("c", {"x": "t1"}, {"y": "t2", "z": "OUT"}),
    ])
    msg = load_error(config)
    assert "steps form a cycle: " in msg
    assert ("step 1 (model 'b') -> 't1' -> step 2 (model 'c') -> 't2' -> step 1 (model 'b')" in msg
            or "step 2 (model 'c') -> 't2' -> step 1 (model 'b') -> 't1' -> step 2 (model 'c')" in msg), msg
    assert "model 'a'" not in msg


def test_self_loop_is_a_cycle():
    config = ensemble(["IN"], ["OUT"], [step("a", {"x": "IN", "w": "t"}, {"y": "t", "z": "OUT"})])
    assert "steps form a cycle: step 0 (model 'a') -> 't' -> step 0 (model 'a')" in load_error(config)


def test_parse_steps_keeps_config_order():
    assert [s.index for s in parse_steps(CHAIN, WHERE)] == [0, 1, 2]


# ---- plan_ensemble: checks against the loaded step models ----

SIMPLE = ensemble(["IN"], ["OUT"], [step("m", {"x": "IN"}, {"y": "OUT"})])


def test_missing_step_model():
    assert "step 0 (model 'm') latest version is not ready" in load_error(SIMPLE, {})


def test_step_max_batch_size_too_small():
    config = ensemble(["IN"], ["OUT"], [step("m", {"x": "IN"}, {"y": "OUT"})], mbs=8)
    msg = load_error(config, {0: model("m", ["x"], ["y"], 4)})
    assert "ensemble max_batch_size is 8 but step 0 (model 'm') allows at most 4" in msg


def test_non_batching_step_in_batching_ensemble_with_explicit_batch_dim():
    config = ensemble(["IN"], ["OUT"], [step("m", {"x": "IN"}, {"y": "OUT"})], mbs=8)
    specs = {0: model("m", ["x"], ["y"], 0, x=("TYPE_FP32", (-1, 3)), y=("TYPE_FP32", (-1, 3)))}
    assert plan_ensemble(config, specs, WHERE).max_batch_size == 8
    bad = {0: model("m", ["x"], ["y"], 0, x=("TYPE_FP32", (-1, 4)), y=("TYPE_FP32", (-1, 3)))}
    msg = load_error(config, bad)
    assert ("ensemble tensor 'IN' has dims [3] after the batch dim from ensemble input 'IN' but step 0 (model 'm') "
            "input 'x' has dims [-1, 4]") in msg


def test_non_batching_ensemble_feeds_batching_step():
    config = ensemble(["IN"], ["OUT"], [step("m", {"x": "IN"}, {"y": "OUT"})], IN=("TYPE_FP32", (-1, 3)),
                      OUT=("TYPE_FP32", (-1, 3)))
    assert plan_ensemble(config, {0: model("m", ["x"], ["y"], 4)}, WHERE).steps[0].model_name == "m"


def test_unknown_step_output_and_input():
    msg = load_error(ensemble(["IN"], ["OUT"], [step("m", {"x": "IN"}, {"q": "OUT"})]),
                     {0: model("m", ["x"], ["y"])})
    assert "step 0 (model 'm') output_map names output 'q', which the model does not have (its outputs: y)" in msg
    msg = load_error(ensemble(["IN"], ["OUT"], [step("m", {"x": "IN", "k": "IN"}, {"y": "OUT"})]),
                     {0: model("m", ["x"], ["y"])})
    assert "step 0 (model 'm') input_map names input 'k', which the model does not have (its inputs: x)" in msg


def test_required_input_must_be_mapped_optional_need_not():
    msg = load_error(SIMPLE, {0: model("m", ["x", "mask"], ["y"])})
    assert "step 0 (model 'm') input_map does not map the model's required input 'mask'" in msg
    spec = model("m", ["x", "mask"], ["y"], mask=("TYPE_FP32", (3,), "optional: true"))
    assert plan_ensemble(SIMPLE, {0: spec}, WHERE).steps[0].inputs == {"x": "IN"}


def test_dtype_mismatch_between_steps():
    config = ensemble(["IN"], ["OUT"], [step("a", {"x": "IN"}, {"y": "t"}), step("b", {"x": "t"}, {"y": "OUT"})])
    specs = {0: model("a", ["x"], ["y"]), 1: model("b", ["x"], ["y"], x=("TYPE_INT64", (3,)))}
    msg = load_error(config, specs)
    assert ("ensemble tensor 't' is FP32 from step 0 (model 'a') output 'y' but step 1 (model 'b') input 'x' "
            "is INT64") in msg


def test_dims_mismatch_and_wildcards():
    config = ensemble(["IN"], ["OUT"], [step("a", {"x": "IN"}, {"y": "t"}), step("b", {"x": "t"}, {"y": "OUT"})])
    specs = {0: model("a", ["x"], ["y"], y=("TYPE_FP32", (2, -1))),
             1: model("b", ["x"], ["y"], x=("TYPE_FP32", (-1, 5)))}
    assert len(plan_ensemble(config, specs, WHERE).steps) == 2
    specs[1] = model("b", ["x"], ["y"], x=("TYPE_FP32", (3, 5)))
    msg = load_error(config, specs)
    assert "ensemble tensor 't' has dims [2, -1] from step 0 (model 'a') output 'y' but step 1 (model 'b') input 'x' "\
           "has dims [3, 5]" in msg


def test_ensemble_output_must_agree_with_its_producer():
    bad_type = ensemble(["IN"], ["OUT"], [step("m", {"x": "IN"}, {"y": "OUT"})], OUT=("TYPE_INT32", (3,)))
    msg = load_error(bad_type, {0: model("m", ["x"], ["y"])})
    assert "ensemble tensor 'OUT' is FP32 from step 0 (model 'm') output 'y' but ensemble output 'OUT' is INT32" in msg
    bad_dims = ensemble(["IN"], ["OUT"], [step("m", {"x": "IN"}, {"y": "OUT"})], OUT=("TYPE_FP32", (4,)))
    msg = load_error(bad_dims, {0: model("m", ["x"], ["y"])})
    assert "from step 0 (model 'm') output 'y' but ensemble output 'OUT' has dims [4]" in msg


def test_ensemble_input_reshape_is_what_steps_see():
    config = ensemble(["IN"], ["OUT"], [step("m", {"x": "IN"}, {"y": "OUT"})],
                      IN=("TYPE_FP32", (6,), "reshape { shape: [2, 3] }"))
    specs = {0: model("m", ["x"], ["y"], x=("TYPE_FP32", (2, 3)))}
    assert plan_ensemble(config, specs, WHERE).inputs == ("IN",)


def test_ensemble_input_dtype_against_step():
    msg = load_error(SIMPLE, {0: model("m", ["x"], ["y"], x=("TYPE_STRING", (3,)))})
    assert "ensemble tensor 'IN' is FP32 from ensemble input 'IN' but step 0 (model 'm') input 'x' is BYTES" in msg
