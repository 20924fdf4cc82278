"""Run by test_sharding.py under `accelerate launch --config_file configs/accelerate/fsdp2.yaml`: a tiny
Llama sharded over the processes, against an unsharded copy. argv[2]: "full"; "lora" (with LoRA adapters);
"uneven" (359 LM head rows and an intermediate size of 63, which 2 processes shard with padding, the head tied
to the embeddings). Writes {"push_max_diff", "generated", "expected"} to argv[1]/rank<N>.json, and on the first
process also {"saved_max_diff", "final_max_diff", "tied"}: the whole student saved as checkpoint.save writes it
and as final/ (checkpoint.save_final), read back, against the unsharded copy's (merged) weights; whether the
whole student and final/ tie their LM head to the embeddings."""

import copy
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_model
from transformers import AutoModelForCausalLM

from esrdistill import checkpoint, models, sharding
from esrdistill.engines.gathering import GatheringEngine
from esrdistill.engines.vllm import student_weights
from helpers import make_model, make_tokenizer


class RecordingEngine:
    """Stands in for the vLLM engine: keeps what `sync` pushes."""

    name = "vllm"

    def sync(self, model) -> None:
        self.pushed = dict(student_weights(model))


accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
kind, out_dir = sys.argv[2], Path(sys.argv[1])
reference = make_model(100, seed=0, vocab_rows=359, intermediate=63, tied=True) if kind == "uneven" else make_model(100, seed=0)
if kind == "lora":
    reference = models.add_lora(reference, 4, 8, 0.0)
    for name, param in reference.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: make the adapters change the weights
            torch.nn.init.normal_(param, 0, 0.1)
student = sharding.shard(copy.deepcopy(reference), torch.device("cpu"), accelerator.num_processes)

engine = GatheringEngine(RecordingEngine(), student)
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
out = {"push_max_diff": push_max_diff, "generated": generated.tolist(), "expected": expected.tolist()}


def _tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


plain = sharding.whole(student)  # every process joins; the first one gets the model
if rank == 0:
    base = plain.get_base_model() if kind == "lora" else plain
    out["tied"] = [_tied(base)]
    if kind != "lora":  # a LoRA checkpoint holds the adapter alone (peft's save_pretrained)
        save_model(plain, str(out_dir / "model.safetensors"))  # as checkpoint.save
        saved = load_file(str(out_dir / "model.safetensors"))
        wanted = reference.state_dict()
        out["saved_max_diff"] = max((saved[k] - wanted[k]).abs().max().item() for k in saved)
    checkpoint.save_final(out_dir / "final", plain, make_tokenizer(), merge_lora=True)
    final = AutoModelForCausalLM.from_pretrained(out_dir / "final")
    out["tied"].append(_tied(final))
    out["final_max_diff"] = max((final.state_dict()[k] - v).abs().max().item() for k, v in expected_push.items())
Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
