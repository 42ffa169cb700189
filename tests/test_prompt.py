import torch
import torch.nn.functional as F


def test_truncated_sequence_gives_the_same_features_as_full_length(tiny_model, encoder):
    """Truncating after the last EOT must not change any text feature."""
    model = tiny_model.model
    ctx = encoder.init_context("", torch.Generator().manual_seed(0))
    truncated = encoder(ctx)
    assert encoder.sequence_length < model.context_length
    # full-length reference through OpenCLIP's own encode_text path on token embeddings
    tokens = tiny_model.tokenizer([f"{' '.join(['X'] * 8)} {c}." for c in encoder.classnames])
    with torch.no_grad():
        x = model.token_embedding(tokens)
        x[:, 1:9] = ctx
        x = x + model.positional_embedding
        x = model.transformer(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        x = x[torch.arange(len(tokens)), tokens.argmax(-1)] @ model.text_projection
    assert torch.allclose(truncated, F.normalize(x, dim=-1), atol=1e-5)


def test_handcrafted_prompt_matches_open_clip_encode_text(tiny_model, encoder):
    tokens = tiny_model.tokenizer([f"a photo of a {c}." for c in encoder.classnames])
    with torch.no_grad():
        ref = tiny_model.model.encode_text(tokens, normalize=True)
    assert torch.allclose(encoder.handcrafted_features(), ref, atol=1e-5)
