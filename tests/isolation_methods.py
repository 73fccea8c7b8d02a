"""Methods that misbehave on purpose, for the isolation tests (imported by worker processes)."""

import os
import signal
import time

from harness.methods.dense import DenseMethod


class CrashMethod(DenseMethod):
    """Dies of a segmentation fault while loading, as a broken native kernel would."""

    def load(self, pretrained):
        os.kill(os.getpid(), signal.SIGSEGV)


class HangMethod(DenseMethod):
    """Never finishes loading."""

    def load(self, pretrained):
        time.sleep(3600)


class OomAtBatch2Method(DenseMethod):
    """Runs out of device memory at batch size 2 and above, like a too-large KV cache."""

    def generate_kwargs(self):
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        class Oom(LogitsProcessor):
            def __call__(self, input_ids, scores):
                if input_ids.shape[0] >= 2:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
                return scores

        return {"logits_processor": LogitsProcessorList([Oom()])}


class UnavailableMethod(DenseMethod):
    """Needs a library no machine has."""

    @classmethod
    def requires(cls):
        return ("a_library_that_is_not_installed",)


class PreparingMethod(DenseMethod):
    """Builds something in the prepare process and compiles its kernels there, as the GPTQ backend does."""

    def prepare(self, resolved, seed, log):
        return {"checkpoint": resolved.pretrained, "fresh": True, "quantize_s": 1.5}

    def compile_kernels(self, pretrained, log):
        return {"kernel_warm_s": 0.25, "saw_checkpoint": self.prepared["checkpoint"] == pretrained}


class ExitOnStackDumpMethod(DenseMethod):
    """Hangs while loading, and exits when asked for its stacks: a worker that ends inside the stack-dump grace."""

    def load(self, pretrained):
        signal.signal(signal.SIGUSR1, lambda number, frame: os._exit(0))
        time.sleep(3600)


class HangWithPidMethod(DenseMethod):
    """Writes its process id to the file QUANTBENCH_TEST_PID_FILE names, then never finishes loading."""

    def load(self, pretrained):
        with open(os.environ["QUANTBENCH_TEST_PID_FILE"], "w") as out:
            out.write(str(os.getpid()))
        time.sleep(3600)
