"""The rollout engines: protocol.py states the interface; hf.py (generate on the student), vllm.py (an in-process
vLLM engine) and gathering.py (either, over a student sharded with FSDP2). build.engine makes one from the config."""
