"""Matching the broker's confirms with replayed publishes (replay.publisher.Confirms).

The broker answers each delivery tag of a confirm channel once: an ack or a nack of one tag, or
with `multiple` of every tag up to it still unanswered. Whatever order it answers in, each
publish's future ends with its own outcome, and a return counted before an ack turns that ack
into Returned.
"""

import asyncio
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rabbit_archive.replay.publisher import Confirms, Nacked, Returned


@st.composite
def broker_answers(draw: st.DrawFn) -> tuple[int, list[tuple[int, bool, bool]]]:
    """A number of publishes and the broker's answers to them: (tag, multiple, nacked), each tag
    answered exactly once, as a broker may (single answers in any order, multiple ones up to a tag)."""
    count = draw(st.integers(1, 60))
    unanswered = set(range(1, count + 1))
    answers: list[tuple[int, bool, bool]] = []
    while unanswered:
        tag = draw(st.sampled_from(sorted(unanswered)))
        multiple = draw(st.booleans())
        nacked = draw(st.booleans())
        answers.append((tag, multiple, nacked))
        if multiple:
            unanswered -= {answered for answered in unanswered if answered <= tag}
        else:
            unanswered.discard(tag)
    return count, answers


def expected_outcomes(count: int, answers: list[tuple[int, bool, bool]]) -> dict[int, str]:
    outcome: dict[int, str] = {}
    for tag, multiple, nacked in answers:
        for answered in range(1, tag + 1) if multiple else (tag,):
            outcome.setdefault(answered, "nacked" if nacked else "confirmed")
    return outcome


def outcome_of(future: "asyncio.Future[None]") -> str:
    if future.cancelled():
        return "cancelled"
    if not future.done():
        return "waiting"
    error = future.exception()
    if error is None:
        return "confirmed"
    if isinstance(error, Nacked):
        return "nacked"
    if isinstance(error, Returned):
        return "returned"
    return type(error).__name__


@given(broker_answers(), st.sets(st.integers(1, 60)))
def test_every_publish_ends_with_the_answer_to_its_own_tag(
    scenario: tuple[int, list[tuple[int, bool, bool]]], returned_ids: set[int]
) -> None:
    count, answers = scenario

    async def run() -> None:
        loop = asyncio.get_running_loop()
        confirms = Confirms()
        futures = [loop.create_future() for _ in range(count)]
        # Publish i carries archive id i + 1; the broker returned some of them before their ack.
        assert [confirms.add(future, index + 1) for index, future in enumerate(futures)] == list(
            range(1, count + 1)
        )
        unclaimed = Counter(returned_ids)

        def returned(archive_id: int | None) -> bool:
            if archive_id is None or unclaimed[archive_id] <= 0:
                return False
            unclaimed[archive_id] -= 1
            return True

        for tag, multiple, nacked in answers:
            confirms.answer(tag, multiple=multiple, nacked=nacked, returned=returned)
        expected = expected_outcomes(count, answers)
        for tag, future in enumerate(futures, start=1):
            want = expected[tag]
            if want == "confirmed" and tag in returned_ids:
                want = "returned"
            assert outcome_of(future) == want, tag
        assert not confirms.waiting
        assert confirms.oldest == count + 1

    asyncio.run(run())


def test_a_future_abandoned_or_sent_again_is_left_alone_by_a_late_answer() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        confirms = Confirms()
        first, second, third = (loop.create_future() for _ in range(3))
        for future in (first, second, third):
            confirms.add(future, None)
        second.cancel()
        confirms.answer(3, multiple=True, nacked=False, returned=lambda _: False)
        assert (outcome_of(first), outcome_of(second), outcome_of(third)) == (
            "confirmed",
            "cancelled",
            "confirmed",
        )

    asyncio.run(run())


def test_a_closed_channel_fails_what_waits_and_only_that() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        confirms = Confirms()
        futures = [loop.create_future() for _ in range(4)]
        for future in futures:
            confirms.add(future, None)
        confirms.answer(2, multiple=True, nacked=False, returned=lambda _: False)
        lost = ConnectionResetError("connection reset")
        confirms.fail(lost)
        assert [outcome_of(future) for future in futures] == ["confirmed"] * 2 + ["ConnectionResetError"] * 2
        assert confirms.failed is lost
        assert not confirms.waiting
        # An answer that arrives after the close finds nothing to settle.
        confirms.answer(4, multiple=True, nacked=True, returned=lambda _: False)
        assert [outcome_of(future) for future in futures][2:] == ["ConnectionResetError"] * 2

    asyncio.run(run())


@pytest.mark.parametrize("multiple", [False, True])
def test_a_tag_answered_twice_or_never_published_changes_nothing(multiple: bool) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        confirms = Confirms()
        future = loop.create_future()
        confirms.add(future, None)
        confirms.answer(1, multiple=multiple, nacked=False, returned=lambda _: False)
        confirms.answer(1, multiple=multiple, nacked=True, returned=lambda _: False)
        confirms.answer(7, multiple=multiple, nacked=True, returned=lambda _: False)
        assert outcome_of(future) == "confirmed"
        assert confirms.oldest == 2

    asyncio.run(run())
