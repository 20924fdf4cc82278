"""Run by test_sharding.py under `accelerate launch --config_file configs/accelerate/fsdp2.yaml`: a tiny
Llama (with LoRA adapters when argv[2] is "lora") sharded over the processes, against an unsharded copy.
Writes {"push_max_diff", "generated", "expected"} to argv[1]/rank<N>.json."""

import copy
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from helpers import make_model
from esrdistill import models, sharding
from esrdistill.engine_vllm import student_weights


class RecordingEngine:
    """Stands in for the vLLM engine: keeps what `sync` pushes."""

    name = "vllm"

    def sync(self, model) -> None:
        self.pushed = dict(student_weights(model))


accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
reference = make_model(100, seed=0)
if sys.argv[2] == "lora":
    reference = models.add_lora(reference, 4, 8, 0.0)
    for name, param in reference.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: make the adapters change the weights
            torch.nn.init.normal_(param, 0, 0.1)
student = sharding.shard(copy.deepcopy(reference), torch.device("cpu"), accelerator.num_processes)

engine = sharding.GatheringEngine(RecordingEngine(), student)
engine.sync(student)
expected_push = dict(student_weights(reference))
assert sorted(engine.engine.pushed) == sorted(expected_push)
push_max_diff = max((engine.engine.pushed[k] - v).abs().max().item() for k, v in expected_push.items())
with sharding.gathered(student):  # the evaluation's engine is synced by the first process alone, gathered
    if rank == 0:
        engine.sync(student)
        push_max_diff = max(push_max_diff, *((engine.engine.pushed[k] - v).abs().max().item() for k, v in expected_push.items()))

prompt = torch.tensor([[1, 2, 3]])
steps = 3 + 5 * rank  # each process decodes another number of steps
with torch.no_grad(), sharding.gathered(student):
    generated = student.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
                                 synced_gpus=False)  # as engine_hf: no peer needed
with torch.no_grad():
    expected = reference.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(
    {"push_max_diff": push_max_diff, "generated": generated.tolist(), "expected": expected.tolist()}))
