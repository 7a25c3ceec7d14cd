"""A test stand-in for a Policy's prompt / decode side over the tiny model's byte-level tokenizer (no
model weights): what rollouts and evaluation need from a policy besides an engine."""


class TinyPromptPolicy:
    compact_prompt = True

    def __init__(self):
        from treedistill.models.tiny import build_tokenizer

        self.tokenizer = build_tokenizer()
        self.eos_token_ids = [self.tokenizer.eos_token_id]

    def prompt_ids(self, messages):
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)
