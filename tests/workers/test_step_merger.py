"""StepMerger alone, with a stand-in DiT: which calls merge, how their rows are joined and split.

Deterministic: the stand-in forward holds its first call until the other thread has queued, so
the next round holds both threads' calls.
"""

from __future__ import annotations

import inspect
import threading

import torch

from workers.parallel.step_merger import SharedForwardFailed, StepMerger


def dit(hidden_states, encoder_hidden_states, timestep, img_ids=None, return_dict=False):
    """Row-wise, like a DiT: each output row depends on its own inputs only."""
    text = encoder_hidden_states.mean(dim=(1, 2))
    return (hidden_states * timestep[:, None, None] + text[:, None, None] + img_ids.sum(),)


def call(rows: int, text_tokens: int = 4, seed: int = 0) -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(seed)
    return (), dict(hidden_states=torch.randn(rows, 3, 2, generator=generator),
                    encoder_hidden_states=torch.randn(rows, text_tokens, 2, generator=generator),
                    timestep=torch.rand(rows, generator=generator), img_ids=torch.arange(6.0).view(3, 2))


class Forwards:
    """The stand-in forward: records each call's rows; the first waits until `others` calls are queued."""

    def __init__(self, merger_ref: list, others: int, fail_merged: bool = False):
        self.rows: list[int] = []
        self._merger, self._others, self._fail_merged = merger_ref, others, fail_merged

    def __call__(self, calls, exchange, branches):
        args, kwargs = calls[0]
        if not self.rows:
            merger = self._merger[0]
            while True:
                with merger._lock:
                    if len(merger._queued) >= self._others:
                        break
                threading.Event().wait(0.001)
        self.rows.append(len(kwargs["hidden_states"]))
        if self._fail_merged and len(self.rows) > 1:
            raise ValueError("a bad row")
        return [dit(*args, **kwargs)]


def _run_threads(calls_per_thread: list[list[tuple[tuple, dict]]], others: int, fail_merged: bool = False):
    merger_ref: list = []
    forwards = Forwards(merger_ref, others, fail_merged)
    merger = StepMerger(forwards, inspect.signature(dit),
                        ["hidden_states", "encoder_hidden_states", "timestep"], max_images=8)
    merger_ref.append(merger)
    outputs: dict[int, list] = {}

    def thread(index: int) -> None:
        try:
            outputs[index] = [merger.run([one], False, ["rows"])[0][0] for one in calls_per_thread[index]]
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            outputs[index] = exc
        finally:
            merger.leave()

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(len(calls_per_thread))]
    threads[0].start()
    while not merger._denoising:  # the first thread is in its first call before the others start
        threading.Event().wait(0.001)
    for started in threads[1:]:
        started.start()
    for joined in threads:
        joined.join(timeout=30)
    return forwards.rows, outputs, merger


def test_calls_of_equal_shape_merge_and_each_gets_its_own_rows():
    first = [call(1, seed=1), call(1, seed=2)]
    second = [call(2, seed=3)]
    rows, outputs, merger = _run_threads([first, second], others=1)
    assert rows == [1, 3]  # the second round ran the first thread's call and the second's as one
    for index, calls in enumerate([first, second]):
        for output, (args, kwargs) in zip(outputs[index], calls):
            assert torch.allclose(output, dit(*args, **kwargs)[0], atol=1e-6)
    assert merger.drain() == ([1, 3], 1)


def test_calls_of_other_prompt_lengths_take_turns_in_the_same_round():
    first = [call(1, text_tokens=4, seed=1), call(1, text_tokens=4, seed=2)]
    second = [call(1, text_tokens=7, seed=3)]
    rows, outputs, _ = _run_threads([first, second], others=1)
    assert rows == [1, 1, 1]
    assert torch.allclose(outputs[1][0], dit(*second[0][0], **second[0][1])[0], atol=1e-6)


def test_a_merged_forward_that_raises_fails_each_call_as_shared():
    """Its calls cannot tell whose rows caused it: each is told so (and runs again alone)."""
    rows, outputs, _ = _run_threads([[call(1, seed=1), call(1, seed=2)], [call(1, seed=3)]], others=1,
                                    fail_merged=True)
    assert rows == [1, 2]
    assert all(isinstance(outputs[index], SharedForwardFailed) and "a bad row" in str(outputs[index])
               for index in (0, 1))
