"""Build dialogue for co-training: video QA (time instruction), ScanQA (<video>) and MMC4 exchanges, as the reference."""

from __future__ import annotations

from .dialogue import IMAGE_TOKEN

VIDEO_TOKEN = "<video>"
CHAT_ROLES = {"human": "user", "gpt": "assistant"}


class DialogueError(ValueError):
    """A conversation whose media tokens cannot be matched to its frames."""


def chat_turns(turns) -> list[tuple[str, str]]:
    """(from, value) with human/gpt -> (role, content) with user/assistant."""
    return [(CHAT_ROLES[who], text) for who, text in turns]


def time_instruction(video_seconds: float, frame_times: list[float]) -> str:
    """The reference's text, character for character (including the missing space after the times)."""
    located = ",".join(f"{t:.2f}s" for t in frame_times)
    return (f"The video lasts for {video_seconds:.2f} seconds, and {len(frame_times)} frames are uniformly "
            f"sampled from it. These frames are located at {located}.Please answer the following questions "
            "related to this video.")


NOISY_MARKER = "QA_GT_caption_based_noisy"


def video_qa_turns(turns, n_frames: int, time_text: str | None = None,
                   image_to_front: bool = True) -> list[tuple[str, str]]:
    """One <image> per frame in the first human turn.

    With a time instruction (the reference): "<image>" * n + "\\n" + text + "\\n" + the first turn with its
    <image> removed. Without one: a single <image> not at the start moves to the front, "<image>\\n" + the
    rest stripped (the reference's preprocess_multimodal; `image_to_front=False` leaves it where it
    stands), then becomes n of them; a turn lacking it gets them in front.
    """
    first = turns[0][1]
    if any(IMAGE_TOKEN in text for _, text in turns[1:]):
        raise DialogueError("<image> outside the first human turn")
    if first.count(IMAGE_TOKEN) > 1:
        raise DialogueError(f"{first.count(IMAGE_TOKEN)} <image> tokens in the first human turn (expected one)")
    images = IMAGE_TOKEN * n_frames
    if time_text is not None:
        first = f"{images}\n{time_text}\n{first.replace(IMAGE_TOKEN, '')}"
    elif IMAGE_TOKEN in first:
        if image_to_front and not first.startswith(IMAGE_TOKEN):
            first = IMAGE_TOKEN + "\n" + first.replace(IMAGE_TOKEN, "").strip()
        first = first.replace(IMAGE_TOKEN, images)
    else:
        first = f"{images}\n{first}"
    return [(turns[0][0], first), *turns[1:]]


def remove_noisy_marker(turns) -> list[tuple[str, str]]:
    """The reference's preprocess_multimodal deletes this LLaVA-Video-178K marker from every turn."""
    return [(who, text.replace(NOISY_MARKER, "")) for who, text in turns]


def scene_qa_turns(turns, n_frames: int) -> list[tuple[str, str]]:
    """ScanQA / SQA3D: the <video> token of the human turns becomes one <image> per frame (exactly one allowed)."""
    found = sum(text.count(VIDEO_TOKEN) for _, text in turns)
    if found != 1 or any(VIDEO_TOKEN in text for who, text in turns if who != "human"):
        raise DialogueError(f"{found} <video> tokens (expected exactly one, in a human turn)")
    if any(IMAGE_TOKEN in text for _, text in turns):
        raise DialogueError("<image> in a scene conversation (frames are given by its <video> token)")
    return [(who, text.replace(VIDEO_TOKEN, IMAGE_TOKEN * n_frames)) for who, text in turns]


MMC4_IMAGE_CHOICES = ("reference", "sentence_order")


def mmc4_images(images, max_images: int, choice: str = "reference") -> list[tuple[str, int]]:
    """The images used, ordered by matched sentence (stable for ties).

    reference: the first max_images as listed in image_info, then ordered (mmc4_dataset.py);
    sentence_order: all ordered first, then the first max_images (the images nearest the start of the text).
    """
    if choice == "reference":
        return sorted(images[:max_images], key=lambda image: image[1])
    return sorted(images, key=lambda image: image[1])[:max_images]


def mmc4_turns(sentences, images: list[tuple[str, int]], join: str = "") -> list[tuple[str, str]]:
    """The reference's exchanges for images already ordered by matched sentence.

    Exchange i: human = (i = 0: the sentences before the first matched one) + "<image>." and assistant =
    the sentences from image i's matched sentence up to image i+1's (the last image: to the end).
    Sentences are joined with `join`: "" as the reference (prepare_conservation), which glues them
    ("...amber.Wobbles..."). A literal "<image>" in the text becomes "<IMAGE>" so it cannot be taken
    for a frame.
    """
    text = [s.replace(IMAGE_TOKEN, "<IMAGE>") for s in sentences]
    matched = [index for _, index in images]
    turns = []
    for i, start in enumerate(matched):
        end = matched[i + 1] if i + 1 < len(matched) else len(text)
        lead = join.join(text[:start]) if i == 0 else ""
        turns += [("human", f"{lead}{IMAGE_TOKEN}."), ("gpt", join.join(text[start:end]))]
    return turns
