"""`ntp-rl rl`'s update path in whole runs and on the stage's own functions: updates per step, the chunked LM head,
gradient checkpointing, truncated importance sampling and non-finite updates."""

import json
from pathlib import Path

import pytest
import torch

from ntp_rl.checkpoint import latest_checkpoint, list_checkpoints
from ntp_rl.config.compose import compose
from ntp_rl.rl.rollout import Group, build_batch
from rl_helpers import RL_TINY, rl_run, step_rows
from rl_helpers import one_thread, policy, rl_args  # noqa: F401 (fixtures)


def test_the_defaults_take_several_updates_per_rollout_batch(tmp_path):
    """With one update per rollout batch the ratio is exactly 1 and clip-higher never acts."""
    (tmp_path / "config.json").write_text("{}")
    rl = compose("rl", [f"init_from={tmp_path}"]).rl
    assert rl.num_mini_batches * rl.num_iterations > 1
    for processes in (1, 2, 4, 8):  # and the default batch splits over the usual process counts
        assert rl.prompts_per_step % (rl.num_mini_batches * processes) == 0


def test_the_default_first_update_through_the_chunked_head_equals_the_full_logits_one(policy, tmp_path, monkeypatch):
    """Issue 30: the default `rl` (its sampling, batch and update settings) from a pre-trained policy; its
    first update's old log-probs, loss and every gradient are the same through either LM head path."""
    from ntp_rl.rl import rollout
    from ntp_rl.stages import rl_update

    real_update = rl_update.update_minibatch

    def first_update(chunked: bool) -> dict:
        recorded = []

        def spy(state, minibatch, sums):
            applied = real_update(state, minibatch, sums)
            if not recorded:
                assert state.session.accelerator.unwrap_model(state.model).chunked is chunked
                recorded.append({"old_logp": minibatch.old_logp.clone(), "loss": sums["loss"].clone(),
                                 **{name: p.grad.clone() for name, p in state.lm.named_parameters()}})
            return applied

        monkeypatch.setattr(rl_update, "update_minibatch", spy)
        if not chunked:  # as for a head the chunked path cannot reproduce
            monkeypatch.setattr(rollout, "has_plain_linear_head", lambda lm: False)
        # Only the held-out checks are made small: they run before the first update and do not touch it.
        rl_run([f"init_from={policy}", f"out_dir={tmp_path}", f"run_dir={tmp_path / str(chunked)}", "rl.max_steps=1",
                "rl.eval_problems=2", "rl.eval_samples=2", "rl.eval_ks=[1]", "logger.wandb.mode=disabled",
                "logger.progress_bar=false"])
        monkeypatch.undo()
        return recorded[0]

    chunked, materialised = first_update(True), first_update(False)
    assert materialised["old_logp"].shape[0] == 64, "the default mini-batch: 8 prompts x 8 samples"
    assert set(chunked) == set(materialised)
    for key, want in materialised.items():
        assert torch.allclose(chunked[key], want, atol=1e-5, rtol=0), key


def test_rollout_calls_hold_a_sequence_count_with_hf_and_every_prompt_with_vllm(tmp_path):
    from ntp_rl.stages.rl_sample import rollout_prompts_per_call

    (tmp_path / "config.json").write_text("{}")
    common = [f"init_from={tmp_path}", "rl.num_generations=16", "rl.sampling.batch_size=64"]
    assert rollout_prompts_per_call(compose("rl", common), 32) == 4, "hf: 64 sequences a call"
    assert rollout_prompts_per_call(compose("rl", [*common, "rl.num_generations=128"]), 32) == 1
    vllm = [*common, "generator=vllm"]
    assert rollout_prompts_per_call(compose("rl", vllm), 32) == 32, "vllm: the round's prompts in one call"
    for args in (common, vllm):
        assert rollout_prompts_per_call(compose("rl", [*args, "rl.prompts_per_generate_call=3"]), 32) == 3


def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_update(policy, tmp_path):
    from ntp_rl.metrics import Sums
    from ntp_rl.stages import rl as rl_stage
    from ntp_rl.stages import rl_update
    from ntp_rl.stages.session import StageSession
    from ntp_rl.tasks import build_task

    runs = {}
    for on in (False, True):
        args = [*RL_TINY, f"init_from={policy}", f"out_dir={tmp_path}", "rl.num_mini_batches=1",
                f"rl.gradient_checkpointing={str(on).lower()}"]
        cfg = compose("rl", args)
        session = StageSession("rl", cfg, args, precision=cfg.rl.precision)
        task = build_task(cfg.task)
        problems = task.problems("train", 4)
        lm, tokenizer, reference, model_dir = rl_stage.load_models(cfg, session, latest_checkpoint(policy / "checkpoints"))
        state = rl_stage.setup(cfg, session, task, lm, tokenizer, reference, problems, problems[:2], model_dir)
        # sampling still runs with the KV cache (the generator's eval mode) and is unchanged
        samples = state.rollouts.generate([problems[0].prompt], 2, state.sampling, seed=0)[0]
        calls = []
        # on a module inside the layer, as a pre-hook: transformers from 5.2x checkpoints the layer's forward, not
        # its __call__, so the layer's own hooks do not run again; the recompute stops once backward has what it needs
        state.lm.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        prompt = tokenizer(problems[0].prompt, add_special_tokens=False)["input_ids"]
        group = Group("p", prompt, [s.token_ids for s in samples], [1.0, 0.0], [True, False], [False, False])
        batch = build_batch([group], torch.tensor([[1.0, -1.0]]), tokenizer.pad_token_id, mask_truncated=False)
        assert rl_update.update_minibatch(state, batch, Sums(rl_update.STEP_SUMS, maxima=rl_update.STEP_MAXIMA))
        runs[on] = ([s.token_ids for s in samples], len(calls), {n: p.grad for n, p in state.lm.named_parameters()})
    assert runs[True][0] == runs[False][0]
    assert runs[False][1] == 1 and runs[True][1] == 2, "with the switch on, the layer runs again in backward"
    for name, want in runs[False][2].items():
        assert torch.allclose(runs[True][2][name], want, atol=1e-6), name


def test_truncated_importance_weights_scale_each_tokens_gradient_in_the_update(policy, tmp_path):
    """rl.tis_cap through the update path: when the engine's log-probs of the sampled tokens differ from the
    trainer's, each token's policy gradient is weighted by min(pi_trainer / pi_engine, cap). The gradient the
    stage's update leaves is checked against one written out by hand, and against the unweighted one."""
    from ntp_rl.models import load_pretrained
    from ntp_rl.stages import rl as rl_stage
    from ntp_rl.stages import rl_update
    from ntp_rl.stages.session import StageSession
    from ntp_rl.tasks import build_task

    cap = 2.0
    args = [*RL_TINY, f"init_from={policy}", f"out_dir={tmp_path}", "rl.num_mini_batches=1", "rl.num_iterations=1",
            "rl.kl_coef=0", f"rl.tis_cap={cap}", "rl.micro_batch_size=3", "rl.loss_aggregation=token_mean"]
    cfg = compose("rl", args)
    session = StageSession("rl", cfg, args, precision=cfg.rl.precision)
    task = build_task(cfg.task)
    problems = task.problems("train", 8)
    init_dir = latest_checkpoint(policy / "checkpoints")
    lm, tokenizer, reference, model_dir = rl_stage.load_models(cfg, session, init_dir)
    state = rl_stage.setup(cfg, session, task, lm, tokenizer, reference, problems, problems[:2], model_dir)
    assert not state.separate_old_pass, "one on-policy update: the trainer's log-probs are the old ones"

    # Two groups of four responses of different lengths, with advantages of both signs.
    generator = torch.Generator().manual_seed(0)
    groups = []
    for g, problem in enumerate(problems[:2]):
        prompt = tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
        responses = [torch.randint(3, len(tokenizer), (5 + 2 * j,), generator=generator).tolist() for j in range(4)]
        groups.append(Group(problem.id, prompt, responses, [1.0, 0.0, 0.0, 1.0], [False] * 4, [False] * 4,
                            logprobs=[[0.0] * len(r) for r in responses]))
    advantages = torch.tensor([[1.0, -0.5, -1.5, 0.75], [-1.0, 2.0, 0.5, -0.25]])
    batch = build_batch(groups, advantages, tokenizer.pad_token_id, mask_truncated=False)
    mask = batch.response_mask
    temperature = state.sampling.temperature

    def trainer_logp():  # by hand: the model's log-softmax of the sampled tokens at the sampling temperature
        logits = state.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
        picked = torch.log_softmax(logits / temperature, -1).gather(-1, batch.input_ids[:, 1:].unsqueeze(-1))
        return picked.squeeze(-1) * mask

    with torch.no_grad():
        logp = trainer_logp()
    # The engine's log-probs differ from the trainer's by -1.5..1.5 nats: weights from e^-1.5 to the cap.
    offsets = (torch.rand(mask.shape, generator=generator) * 3 - 1.5) * mask
    batch.rollout_logp = (logp - offsets) * mask
    weights = offsets.exp().clamp(max=cap) * mask
    assert (weights[mask] == cap).any() and (weights[mask] < 0.5).any(), "some weights capped, some small"

    def gradient(token_weights):  # of -mean over response tokens of A * w * log pi (ratio 1 at this update)
        state.optimizer.zero_grad(set_to_none=True)
        loss = -(batch.advantages.unsqueeze(-1) * token_weights * trainer_logp())[mask].sum() / mask.sum()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in state.lm.parameters() if p.grad is not None])

    expected, unweighted = gradient(weights), gradient(mask.float())
    state.optimizer.zero_grad(set_to_none=True)
    from ntp_rl.metrics import Sums

    sums = Sums(rl_update.STEP_SUMS, device=session.device, maxima=rl_update.STEP_MAXIMA)
    assert rl_update.update_minibatch(state, batch, sums)
    got = torch.cat([p.grad.flatten() for p in state.lm.parameters() if p.grad is not None])
    scale = expected.abs().max()
    assert (got - expected).abs().max() < 1e-4 * scale
    assert (unweighted - expected).abs().max() > 0.05 * scale, "the weights must change the gradient for this to test them"
    assert sums["is_ratio"].item() == pytest.approx(weights[mask].sum().item(), rel=1e-4)


def _poison_update(monkeypatch, bad_calls):
    """The policy loss turns NaN on the given calls (one call per mini-batch update here)."""
    from ntp_rl.rl import policy_loss

    clean, calls = policy_loss.POLICY_LOSSES["ppo_clip"], {"n": 0}

    def poisoned(inputs, rl):
        out = clean(inputs, rl)
        calls["n"] += 1
        return out if calls["n"] not in bad_calls else type(out)(out.loss * float("nan"), out.low_clipped, out.high_clipped)

    monkeypatch.setitem(policy_loss.POLICY_LOSSES, "ppo_clip", poisoned)


def test_a_non_finite_update_stops_the_run_by_default(rl_args, tmp_path, monkeypatch):
    from ntp_rl.errors import TrainingDiverged

    _poison_update(monkeypatch, {3})  # 2 updates a step, one micro-batch each: step 2 goes bad
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="step 2"):
        rl_run([*rl_args, "rl.save_every=1", f"run_dir={run_dir}"])
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "diverged" and "step_00000001" in info["error"]
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000001"]


def test_non_finite_updates_can_be_skipped_and_counted(rl_args, tmp_path, monkeypatch, capsys):
    _poison_update(monkeypatch, {3})
    results = rl_run([*rl_args, "rl.on_nonfinite=skip", "rl.eval_every=10", "rl.max_steps=3"])
    steps = step_rows(Path(results["checkpoint"]).parents[1])
    assert [steps[s]["nonfinite_skips"] for s in (1, 2, 3)] == [0, 1, 1]
    assert all(value is not None for row in steps.values() for value in row.values()), "the bad update is not averaged in"
    assert results["nonfinite_skips"] == 1 and "mini-batch update skipped" in capsys.readouterr().out

    _poison_update(monkeypatch, {1, 2})
    with pytest.raises(Exception, match="diverged at step 1"):
        rl_run([*rl_args, "rl.on_nonfinite=skip", "rl.max_nonfinite_skips=1", f"run_dir={tmp_path / 'two'}"])
