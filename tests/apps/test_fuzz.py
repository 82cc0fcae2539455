"""Property-based fuzzing: random images, audio and chat messages either process into well-formed
outputs or raise our InputError, never anything else."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.processing import Gemma4UAudioFeatureExtractor, Gemma4UImageProcessor
from mlx_gemma4u.processing.messages import check_messages

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([np.uint8, np.uint16, np.int32, np.float16, np.float32, np.float64, np.bool_])


@FUZZ
@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=70),
    dtype=DTYPES,
    budget=st.sampled_from([70, 140, 0, 71]),
    data=st.data(),
)
def test_image_processor_on_random_arrays(shape, dtype, budget, data):
    floats = st.floats(-2, 2, width=32) | st.sampled_from([np.nan, np.inf])
    array = data.draw(hnp.arrays(dtype, shape, elements=floats if dtype is np.float32 else None))
    try:
        out = Gemma4UImageProcessor()(array, max_soft_tokens=budget)
    except InputError:
        return
    pixels, positions = out["pixel_values"], out["image_position_ids"]
    assert pixels.shape == (1, budget, 6912) and pixels.dtype == np.float32
    assert np.all((pixels >= 0) & (pixels <= 1))
    assert positions.shape == (1, budget, 2)
    n = int(out["num_soft_tokens_per_image"][0])
    assert 0 < n <= budget and np.all(positions[0, n:] == -1) and np.all(positions[0, :n] >= 0)


@FUZZ
@given(
    samples=st.integers(0, 5000),
    channels=st.sampled_from([None, 1, 2, 3]),
    rate=st.sampled_from([8000, 16000, 44100, 0, -1]),
    dtype=st.sampled_from([np.float32, np.float64, np.int16, np.int32]),
    special=st.sampled_from([None, np.nan, np.inf]),
)
def test_audio_extractor_on_random_clips(samples, channels, rate, dtype, special):
    shape = (samples,) if channels is None else (samples, channels)
    clip = (np.random.default_rng(samples).standard_normal(shape) * 1000).astype(dtype)
    if special is not None and samples and np.issubdtype(dtype, np.floating):
        clip.flat[samples // 2] = special
    try:
        out = Gemma4UAudioFeatureExtractor()((clip, rate))
    except InputError:
        return
    features, mask = out["input_features"], out["input_features_mask"]
    assert features.ndim == 3 and features.shape[2] == 640 and np.isfinite(features).all()
    assert mask.shape == features.shape[:2] and mask.all() and mask.shape[1] >= 1


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
ITEMS = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "audio", "video", "blob"])},
    optional={"text": JSONISH, "path": JSONISH, "url": JSONISH},
)
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "robot", 3])},
        optional={"content": st.one_of(st.text(max_size=10), st.lists(ITEMS | JSONISH, max_size=3), JSONISH)},
    ),
    max_size=4,
)


@FUZZ
@given(messages=MESSAGES | JSONISH)
def test_message_checker_accepts_or_names_the_problem(messages, processor):
    try:
        check_messages(messages)
    except InputError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert isinstance(processor.apply_chat_template(messages, add_generation_prompt=True), str)
