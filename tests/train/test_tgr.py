"""TGR-MoE's teacher-guided routing (supplement Eq. S1–S3; reconstruction in train/moe/tgr.py): the distillation
loss against a float64 loop, who routes and which router each loss reaches in both configurations, the plan
of which cached layer guides which block, the layers in the batches, and the terms in a training run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.moe import MoEMLP
from train.moe.router import router_distill_loss
from train.moe.tgr import RouteGuide, TeacherRouter


def test_router_distill_is_the_kl_from_teacher_to_student_per_token_in_float64():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(7, 5, generator=g, requires_grad=True)
    teacher = torch.randn(7, 5, generator=g, requires_grad=True)
    for score in ("softmax", "sigmoid"):
        got = router_distill_loss(student, teacher, score)
        total = 0.0
        for t in range(7):  # by hand: p = the routing distribution, KL(p_T || p_S), mean over tokens
            if score == "softmax":
                pt, ps = np.exp(teacher[t].double().detach().numpy()), np.exp(student[t].double().detach().numpy())
            else:
                pt = 1 / (1 + np.exp(-teacher[t].double().detach().numpy()))
                ps = 1 / (1 + np.exp(-student[t].double().detach().numpy()))
            pt, ps = pt / pt.sum(), ps / ps.sum()
            total += float((pt * np.log(pt / ps)).sum())
        assert float(got.detach()) == pytest.approx(total / 7, rel=1e-5)
        gs, gt = torch.autograd.grad(got, (student, teacher), allow_unused=True)
        assert gs.abs().sum() > 0 and (gt is None or gt.abs().sum() == 0)  # the student follows; the teacher is not pulled
    same = torch.randn(4, 3, generator=g)
    assert float(router_distill_loss(same, same, "softmax")) == pytest.approx(0.0, abs=1e-7)


def _layer_and_guide(teacher_routes: bool, seed: int = 0):
    torch.manual_seed(seed)
    mlp = MoEMLP(6, 10, num_experts=4, top_k=2, backend="loop")
    teacher = TeacherRouter(9, mlp.router, noise_std=0.0)
    x, feats = torch.randn(8, 6), torch.randn(5, 9) * 30 + 7  # raw residual-stream scale: the router normalizes it
    rows = torch.tensor([1, 2, 4, 5, 7])  # tokens 0, 3 and 6 have no teacher features (CLS, registers)
    return mlp, teacher, x, feats, rows


def _expert(mlp, e, v):
    w1, b1, w2, b2 = mlp.experts.w1, mlp.experts.b1, mlp.experts.w2, mlp.experts.b2
    return F.gelu(v @ w1[e] + b1[e]) @ w2[e] + b2[e]


def test_upper_bound_the_teacher_router_routes_and_the_student_router_learns_only_by_distillation():
    mlp, teacher, x, feats, rows = _layer_and_guide(teacher_routes=True)
    t_route = teacher(feats)
    y, aux = mlp(x, guide=RouteGuide(rows, t_route, teacher_routes=True))
    s_route = mlp.router(x)
    ref = torch.zeros_like(y)
    for i in range(8):  # by hand: guided tokens take the teacher's experts and gates, the others the student's
        r = (rows == i).nonzero()
        idx, gates = ((t_route.topk_idx[r[0, 0]], t_route.topk_weights[r[0, 0]]) if len(r)
                      else (s_route.topk_idx[i], s_route.topk_weights[i]))
        ref[i] = sum(gates[j] * _expert(mlp, int(idx[j]), x[i]) for j in range(2))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert float(aux["router_loss"]) == 0  # Eq. S3: no load balancing (nor task loss) for the student router
    task = (y * torch.randn_like(y)).sum() + aux["router_loss"]
    task.backward(retain_graph=True)
    assert mlp.router.proj.weight.grad is None or mlp.router.proj.weight.grad.abs().sum() == 0
    assert teacher.router.proj.weight.grad.abs().sum() > 0  # Eq. S1: the task loss trains the teacher router
    teacher.zero_grad()
    aux["router_distill"].backward()
    assert mlp.router.proj.weight.grad.abs().sum() > 0  # Eq. S2: distillation is what the student router learns from
    assert teacher.router.proj.weight.grad is None or teacher.router.proj.weight.grad.abs().sum() == 0


def test_tgr_the_student_routes_and_the_task_gradient_reaches_both_routers_as_if_the_teacher_gated():
    mlp, teacher, x, feats, rows = _layer_and_guide(teacher_routes=False)
    plain, _ = mlp(x)
    t_route = teacher(feats)
    y, aux = mlp(x, guide=RouteGuide(rows, t_route, teacher_routes=False))
    torch.testing.assert_close(y, plain, rtol=0, atol=0)  # the forward is exactly the student's routing
    w = torch.randn_like(y)
    (y * w).sum().backward()
    got_teacher = teacher.router.proj.weight.grad.clone()
    assert mlp.router.proj.weight.grad.abs().sum() > 0 and got_teacher.abs().sum() > 0
    # reference: the teacher router's gates (for the experts the student picked) gate the guided tokens;
    # the loss is linear in y, so its gradient w.r.t. the gates does not depend on their values
    teacher.zero_grad()
    s_route = mlp.router(x)
    scores = teacher(feats).scores
    ref = torch.zeros_like(y)
    for i in range(8):
        r = (rows == i).nonzero()
        for j in range(2):
            e = int(s_route.topk_idx[i, j])
            if len(r):  # the teacher's score of that expert (renormalized over the k picked, as this layer gates)
                picked = scores[r[0, 0], s_route.topk_idx[i]]
                gate = scores[r[0, 0], e] / (picked.sum() if mlp.router.renormalize else 1.0)
            else:
                gate = s_route.topk_weights[i, j].detach()
            ref[i] = ref[i] + gate * _expert(mlp, e, x[i]).detach()
    (ref * w).sum().backward()
    torch.testing.assert_close(got_teacher, teacher.router.proj.weight.grad, rtol=1e-5, atol=1e-7)
    assert float(aux["router_loss"].detach()) > 0  # the student router keeps its own load balancing


def test_the_teacher_router_entropy_term_is_minimized_and_its_load_balance_is_eq9():
    from train.moe.router import load_balance_loss, token_routing_entropy

    mlp, teacher, x, feats, rows = _layer_and_guide(teacher_routes=False, seed=1)
    t_route = teacher(feats)
    _, aux = mlp(x, guide=RouteGuide(rows, t_route, teacher_routes=False))
    assert float(aux["guide_load_balance_loss"].detach()) == pytest.approx(float(load_balance_loss(t_route.probs, t_route.topk_idx).detach()))
    before = float(aux["guide_entropy"].detach())
    assert before == pytest.approx(float(token_routing_entropy(t_route.logits.detach().softmax(-1))))
    opt = torch.optim.SGD(teacher.parameters(), lr=5.0)
    for _ in range(20):  # descending the term alone makes the teacher's per-token routing more confident
        opt.zero_grad()
        mlp(x, guide=RouteGuide(rows, teacher(feats), teacher_routes=False))[1]["guide_entropy"].backward()
        opt.step()
    after = float(token_routing_entropy(teacher(feats).logits.softmax(-1)))
    assert after < before - 0.01


# ------------------------------------------------------------------------------------------ against a store
def _cfg(**moe):
    from train.config import TrainConfig

    return TrainConfig.model_validate({
        "model": {"preset": "tiny", "depth": 4, "moe": {"layers": "odd", "experts": 3, "top_k": 2, "backend": "loop",
                                                        "guide": "tgr", **moe}},
        "data": {"seq_len": 160, "seqs_per_batch": 2, "workers": 0}, "run": {"steps": 3, "checkpoint_every": 2}})


def test_the_plan_maps_moe_blocks_evenly_onto_the_cached_layers_and_refuses_what_the_store_cannot_serve(
        train_store, stage2_store):
    from storage.store import FeatureStore
    from train.model import guide_plan

    store = FeatureStore.open(train_store)  # dino caches layers 1 and 2, siglip none
    plan = guide_plan(_cfg().model, store, ["siglip", "dino"])
    assert (plan.teacher, plan.layers, plan.dims, plan.teacher_routes) == ("dino", {1: 1, 3: 2}, {1: 48, 2: 48}, False)
    assert plan.reads == {"dino": [1, 2]}
    three = _cfg(layers=[0, 1, 3]).model
    assert guide_plan(three, store, ["dino"]).layers == {0: 1, 1: 2, 3: 2}  # j·(m−1)/(n−1) = 0, 0.5, 1: ties go deeper
    assert guide_plan(_cfg(layers=[3]).model, store, ["dino"]).layers == {3: 2}  # one block: the deepest layer
    mapped = _cfg(tgr={"layers": {3: 1}, "routes": "teacher"}).model
    assert guide_plan(mapped, store, ["dino"]).layers == {3: 1} and guide_plan(mapped, store, ["dino"]).teacher_routes
    for model, teachers, where, message in [
        (_cfg().model, ["dino"], FeatureStore.open(stage2_store), r"has none for any teacher; cache them with "
                                                                   r"`pipeline cache-teachers \.\.\. --name dino --layers 2,4`"),
        (_cfg(tgr={"teacher": "siglip"}).model, ["dino", "siglip"], store, r"none for teacher 'siglip'.*--name siglip"),
        (_cfg(tgr={"teacher": "clip"}).model, ["dino"], store, r"tgr.teacher 'clip' is not distilled"),
        (_cfg(tgr={"layers": {2: 1}}).model, ["dino"], store, r"block\(s\) \[2\] that are not MoE blocks \(\[1, 3\]\)"),
        (_cfg(tgr={"layers": {1: 5}}).model, ["dino"], store, r"layer\(s\) \[5\] .* --name dino --layers 5`"),
    ]:
        with pytest.raises(ValueError, match=message):
            guide_plan(model, where, teachers)
    from config import ConfigError, load_config
    from train.config import TrainConfig

    with pytest.raises(ConfigError, match="needs token-choice MoE layers"):
        load_config(TrainConfig, None, {"model": {"moe": {"guide": "tgr"}}})
    with pytest.raises(ConfigError, match="model.moe.tgr.layers"):  # an empty map would silently guide nothing
        load_config(TrainConfig, None, {"model": {"moe": {"layers": "all", "guide": "tgr", "tgr": {"layers": {}}}}})


def test_batches_carry_the_cached_layers_of_each_patch_token_through_flips_and_crops(train_store):
    from storage.reader import StoreReader, read_batch
    from train.config import DataConfig
    from train.data import PlanStream, StoreBatches

    cfg = DataConfig(seq_len=160, seqs_per_batch=2, workers=0)
    plain = StoreBatches(train_store, ["dino"], cfg, patch=16, registers=4, seed=0, layers={"dino": [1, 2]})
    plan = next(PlanStream(plain.reader.indexes, cfg, registers=4, seed=0).steps())
    batch = plain[plan]
    items = read_batch(StoreReader(train_store, ["dino"], {"dino": [1, 2]}), plan.microbatch.rows)
    for k in (1, 2):  # layout order = the images' patch rows one after the other, as the patch targets
        want = np.concatenate([it.layers["dino"][k] for it in items])
        np.testing.assert_array_equal(batch["layers"]["dino"][k].numpy(), want)
    # flips and crops move a layer's rows exactly as the patch targets': in this tiny teacher the patch target
    # is the final LayerNorm of block 2's output, so that relation must hold row by row after augmentation
    moved = StoreBatches(train_store, ["dino"], cfg.model_copy(update={"flip": True, "crop": True, "crop_min_scale": 0.3}),
                         patch=16, registers=4, seed=0, layers={"dino": [2]})[plan]
    assert moved["layout"].patch_pos.numel() < batch["layout"].patch_pos.numel()  # something was cropped
    last = moved["layers"]["dino"][2].float()
    normed = F.layer_norm(last, last.shape[-1:])
    cos = F.cosine_similarity(normed, moved["targets"]["dino"]["patches"].float(), dim=-1)
    assert float(cos.min()) > 0.99, float(cos.min())


def test_tgr_trains_with_its_terms_resumes_with_the_teacher_routers_and_evaluates_without_them(train_store, tmp_path):
    from safetensors.torch import load_file

    from train.checkpoint import latest_checkpoint
    from train.config import with_stores
    from train.rundir import prepare_run
    from train.trainer import train

    for routes in ("student", "teacher"):
        cfg = with_stores(_cfg(tgr={"routes": routes}), train_store)
        run = tmp_path / routes
        record = prepare_run(run, cfg)
        assert record["guide"] == {"teacher": "dino", "layers": {"1": 1, "3": 2}, "routes": routes}
        result = train(cfg, None, run)
        rec = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for key in ("loss/router_distill", "loss/guide_load", "loss/guide_entropy", "moe/0/router_distill",
                    "moe/1/guide_agreement", "moe/1/guide_usage_entropy"):
            assert all(math.isfinite(r[key]) for r in rec), key
        assert rec[0]["loss/router_distill"] == pytest.approx(5.0 * (rec[0]["moe/0/router_distill"]
                                                                     + rec[0]["moe/1/router_distill"]), rel=1e-5)
        assert (rec[0]["loss/router"] == 0) == (routes == "teacher")  # S3: no router loss for the student router
        names = set(load_file(str(latest_checkpoint(run / "checkpoints") / "model.safetensors")))
        assert {"guides.1.router.proj.weight", "guides.3.router.proj.weight"} <= names
        cfg4 = cfg.model_copy(update={"run": cfg.run.model_copy(update={"steps": 4})})
        assert train(cfg4, None, run).resumed_from == 3 and result.steps == 3
    from eval.features import load_trained

    model, _ = load_trained(tmp_path / "teacher", train_store, cfg4, ["dino", "siglip"], torch.device("cpu"))
    assert len(model.guides) == 0  # evaluation: the student routes and no layers are needed


def test_in_a_packed_batch_the_teacher_router_of_each_patch_token_reads_that_tokens_layer_row(train_store):
    """Upper bound, no noise: the experts used at each patch token are its teacher router's top-k on its own
    cached row, found here without the model's row mapping (padding, CLS and registers skipped by hand)."""
    from storage.store import FeatureStore
    from train.data import PlanStream, StoreBatches
    from train.model import build_model

    cfg = _cfg(tgr={"routes": "teacher", "noise_std": 0.0})
    store = FeatureStore.open(train_store)
    torch.manual_seed(0)
    model = build_model(cfg, store, ["dino", "siglip"], training=True)
    ds = StoreBatches(train_store, ["dino", "siglip"], cfg.data, patch=16, registers=cfg.model.registers, seed=0,
                      layers=model.guide.reads)
    batch = ds[next(PlanStream(ds.reader.indexes, cfg.data, registers=4, seed=0).steps())]
    layout = batch["layout"]
    assert layout.num_images > 2 and bool((layout.doc_ids < 0).any())  # several images per sequence, padding
    with torch.no_grad():
        _, out = model(batch["pixels"], layout, layers=batch["layers"])
    real = (layout.doc_ids.reshape(-1) >= 0).long()
    position = (torch.cumsum(real, 0) - 1)[layout.patch_pos]  # each patch token's place among the real tokens
    for j, (block, k) in enumerate(model.guide.layers.items()):
        want = model.guides[str(block)](batch["layers"]["dino"][k]).topk_idx
        assert torch.equal(out.aux[j]["expert_idx"][position], want), block


def test_a_resumed_run_keeps_the_recorded_teacher_layer_map(train_store, tmp_path):
    from train.config import with_stores
    from train.rundir import RunError, pin_guide, prepare_run

    cfg = with_stores(_cfg(), train_store)
    run = tmp_path / "run"
    assert prepare_run(run, cfg)["guide"]["layers"] == {"1": 1, "3": 2}
    record = json.loads((run / "store.json").read_text())  # as if the store had other layers when it started
    (run / "store.json").write_text(json.dumps({**record, "guide": {**record["guide"], "layers": {"1": 2, "3": 2}}}))
    assert prepare_run(run, cfg)["guide"]["layers"] == {"1": 2, "3": 2}
    assert pin_guide(cfg, json.loads((run / "store.json").read_text())).model.moe.tgr.layers == {1: 2, 3: 2}
    (run / "store.json").write_text(json.dumps({**record, "guide": {**record["guide"], "layers": {"1": 5, "3": 2}}}))
    with pytest.raises(RunError, match="--layers 5"):  # the recorded layer is gone: named, not silently remapped
        prepare_run(run, cfg)


def test_train_refuses_a_tgr_run_on_a_store_without_layers_before_writing_anything(stage2_store, tmp_path):
    from cli_helpers import error_line, run_pipeline

    out = tmp_path / "run"
    proc = run_pipeline("train", "--store", stage2_store, "--out", out, "--model", "tiny", "--steps", "1",
                        "--set", "model.moe.layers=[1]", "--set", "model.moe.guide=tgr", "--set", "data.workers=0")
    error_line(proc, stage2_store, "cache-teachers ... --name dino --layers 2`")
    assert not (out / "config.toml").exists()
