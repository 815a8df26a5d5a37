"""DeepSpeed's ``tensorboard`` monitor section on the engine (test_engine_api.py has the CSV monitor alone).

The event files hold the scalars the CSV monitor writes in the same run, under DeepSpeed's tags
(``Train/Samples/train_loss``, ``lr``, ``loss_scale``) and at the ``global_samples`` steps, in a run that ends
without closing the writer. (The monitor also flushes after each step, as DeepSpeed's ``TensorBoardMonitor``
does; on a local disk the writer's thread appends each event within moments anyway, so no test here can tell
that flush apart: docs/mutation.md, thirteenth sample.)
"""

import os

import torch
from engine_common import ds_config, make_model
from harness import run_distributed
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the test extra

import megatron_core

TAGS = ("train_loss", "lr", "loss_scale")


def _train(directory):
    monitor = {"enabled": True, "output_path": directory}
    scheduler = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 4}}
    config = ds_config(1, 2, 0, scheduler=scheduler, csv_monitor={**monitor, "job_name": "csv"},
                       tensorboard={**monitor, "job_name": "tb"})
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        engine.backward(engine(torch.randn(2, 8, generator=gen)).pow(2).mean())
        engine.step()
    engine.parallel_state.destroy()
    # The rank ends with os._exit, as a killed run would: nothing closes or flushes the writer after the steps.


def test_tensorboard_holds_the_csv_monitors_scalars_after_each_step(tmp_path):
    run_distributed(_train, 1, str(tmp_path), timeout=120)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(f"Train/Samples/{name}" for name in TAGS)
    written = {}
    for name in TAGS:
        with open(os.path.join(tmp_path, "csv", f"Train_Samples_{name}.csv"), encoding="utf-8") as f:
            rows = [line.split(",") for line in f.read().splitlines()[1:]]
        # TensorBoard stores float32
        written[name] = [(int(step), float(torch.tensor(float(value), dtype=torch.float32))) for step, value in rows]
        assert [(e.step, e.value) for e in events.Scalars(f"Train/Samples/{name}")] == written[name], name
    assert [step for step, _ in written["lr"]] == [4, 8, 12]  # three optimizer steps of 2 x 2 samples
    assert len({value for _, value in written["lr"]}) == 3 and len({value for _, value in written["train_loss"]}) == 3
