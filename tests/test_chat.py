"""Conversations through real chat templates: the loss is on the assistant turns and their end-of-turn tokens,
nothing else (lowbit_ft.chat)."""

import copy

import pytest

from lowbit_ft.chat import check_conversation, conversation_example, end_of_turn_id
from lowbit_ft.records import IGNORE_INDEX

CONVERSATION = [
    {"role": "system", "content": "You are a terse geography tutor."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? Answer in one word."},
    {"role": "assistant", "content": "Tokyo, 東京."},
    {"role": "user", "content": "Which is larger, 2 or 10?"},
    {"role": "assistant", "content": "10 is larger than 2."},
]
REPLIES = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]

# LLaMA-3-Instruct's template (header ids, trimmed contents, <|eot_id|> after every message)
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
# Mistral-Instruct v0.3's template: the system prompt goes into the *last* user message, so rendering a prefix of
# the conversation does not give a prefix of its rendering; replies are ' ' + content + eos
MISTRAL = ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
           "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
           "{{- bos_token }}{%- for message in loop_messages %}"
           "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{- raise_exception('After the optional system message, conversation roles must alternate "
           "user/assistant/user/assistant/...') }}{%- endif %}{%- if message['role'] == 'user' %}"
           "{%- if loop.last and system_message is defined %}"
           "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
           "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
           "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}{%- endif %}"
           "{%- endfor %}")
# Mistral-Instruct v0.1's: no system message at all
MISTRAL_NO_SYSTEM = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
                     "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
                     "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
                     "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                     "{{ message['content'] + eos_token + ' ' }}{% endif %}{% endfor %}")


def chatml(tokenizer):
    return tokenizer  # SmolLM2's own template: <|im_start|>role\n ... <|im_end|>\n


def llama3(tokenizer):
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tokenizer.chat_template = LLAMA3
    return tokenizer


def mistral(tokenizer, template=MISTRAL):
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture
def tokenizer(smol_tokenizer):
    return copy.deepcopy(smol_tokenizer)


def labelled_runs(example, tokenizer) -> list[str]:
    """The decoded runs of consecutive label-bearing tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize(("make", "end_of_turn"), [(chatml, "<|im_end|>"), (llama3, "<|eot_id|>"), (mistral, "</s>")],
                         ids=["chatml", "llama3", "mistral"])
def test_only_the_assistant_turns_and_their_end_of_turn_tokens_carry_labels(tokenizer, make, end_of_turn):
    tokenizer = make(tokenizer)
    ex = conversation_example(check_conversation(CONVERSATION, "test"), tokenizer, 4096)
    assert ex["input_ids"] == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)[
        "input_ids"]
    # Mistral writes ' ' + reply: the byte-level BPE joins that space to a first word (' Paris'), not to digits
    assert [run.lstrip(" ") for run in labelled_runs(ex, tokenizer)] == [reply + end_of_turn for reply in REPLIES]


def test_last_assistant_and_all(tokenizer):
    tokenizer = llama3(tokenizer)
    last = conversation_example(CONVERSATION, tokenizer, 4096, train_on="last_assistant")
    assert labelled_runs(last, tokenizer) == [REPLIES[-1] + "<|eot_id|>"]
    every = conversation_example(CONVERSATION, tokenizer, 4096, train_on="all")
    assert every["labels"] == every["input_ids"] == last["input_ids"]


def test_generation_tags_give_the_mask(tokenizer):
    """A template with {% generation %} marks the assistant text itself; its mask is used as given."""
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                               "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}"
                               "{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}")
    ex = conversation_example(CONVERSATION, tokenizer, 4096)
    assert labelled_runs(ex, tokenizer) == [reply + "<|im_end|>" for reply in REPLIES]


def test_truncation_keeps_the_start(tokenizer):
    full = conversation_example(CONVERSATION, tokenizer, 4096)
    cut = conversation_example(CONVERSATION, tokenizer, 30)
    assert cut["input_ids"] == full["input_ids"][:30] and cut["labels"] == full["labels"][:30]


@pytest.mark.parametrize(("messages", "message"), [
    ([], "an empty conversation"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], "message 1 has role 'bot'"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}],
     "message 1 is a system message"),
    ([{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}], "message 0 is not a {role, content}"),
])
def test_bad_conversations_are_one_line_naming_the_record(messages, message):
    with pytest.raises(ValueError, match=r"^line 7: ") as err:
        check_conversation(messages, "line 7")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_template_that_cannot_render_a_system_message_names_the_record(tokenizer):
    tokenizer = mistral(tokenizer, MISTRAL_NO_SYSTEM)
    with pytest.raises(ValueError, match=r"^row 3: the tokenizer's chat template cannot render this conversation "
                                         r"\(Conversation roles must alternate"):
        conversation_example(CONVERSATION, tokenizer, 4096, where="row 3")
    ok = conversation_example(CONVERSATION[1:], tokenizer, 4096)  # without the system prompt it renders
    assert labelled_runs(ok, tokenizer) == [reply + "</s>" for reply in REPLIES]


def test_a_template_that_rewrites_replies_is_refused(tokenizer):
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}")
    with pytest.raises(ValueError, match="changes the assistant's text"):
        conversation_example(CONVERSATION, tokenizer, 4096, where="row 0")


@pytest.mark.parametrize(("make", "token"), [(chatml, "<|im_end|>"), (llama3, "<|eot_id|>"), (mistral, "</s>")],
                         ids=["chatml", "llama3", "mistral"])
def test_generation_stops_at_the_templates_end_of_turn_token(tokenizer, make, token):
    tokenizer = make(tokenizer)
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids(token)


def test_a_template_without_an_end_of_turn_token_has_none(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert end_of_turn_id(tokenizer) is None
