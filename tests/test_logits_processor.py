"""The public logits hook of generation: a callable sees the ids generated so far and returns the
logits the next token is sampled from (structured output masks the grammar's forbidden tokens so)."""
import numpy as np
import pytest

from blobstore.runtime import demo, load


@pytest.fixture(scope="module")
def model():
    return load(demo.demo_path(), max_seq_len=256)


def test_a_forbidden_token_is_never_picked_and_the_processor_sees_the_output_so_far(model):
    free = model.generate("And God said", max_new_tokens=12, temperature=0, ignore_eos=True).token_ids
    banned = free[0]
    seen = []

    def ban(generated, logits):
        seen.append(list(generated))
        assert logits.shape == (model.decodable_vocab_size,)
        return np.where(np.arange(logits.size) == banned, -np.inf, logits)

    result = model.generate("And God said", max_new_tokens=12, temperature=0, ignore_eos=True,
                            logits_processor=ban)
    assert banned not in result.token_ids and result.token_ids[0] != free[0]
    assert seen == [result.token_ids[:i] for i in range(len(result.token_ids))]


def test_a_processor_allowing_one_token_forces_it_even_when_sampling(model):
    forced = model.tokenizer.encode("the", add_bos=False)[0]
    only = lambda generated, logits: np.where(np.arange(logits.size) == forced, logits, -np.inf)
    result = model.generate("And", max_new_tokens=5, temperature=1.0, seed=3, ignore_eos=True, logits_processor=only)
    assert result.token_ids == [forced] * 5
