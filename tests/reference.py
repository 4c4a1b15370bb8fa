"""Slow, obviously-correct references the fast verbs are tested against."""



def slow_path_patching(model, cs, metric, sender, receivers, last_only=False, sender_last=False):
    """Obviously-correct reference: full forwards, one sender, TransformerLens' run_with_hooks."""
    L = model.cfg.n_layers
    _, clean = model.run_with_cache(cs.clean_tokens)
    _, corr = model.run_with_cache(cs.corrupted_tokens)
    ls, hs = sender

    def freeze(layer):
        def fn(z, hook):
            z = clean[f"blocks.{layer}.attn.hook_z"].clone()
            if layer == ls and not sender_last:
                z[:, :, hs] = corr[f"blocks.{layer}.attn.hook_z"][:, :, hs]
            elif layer == ls:
                for b in range(z.shape[0]):
                    p = int(cs.last_pos[b])
                    z[b, p, hs] = corr[f"blocks.{layer}.attn.hook_z"][b, p, hs]
            return z
        return fn

    seen = {}

    def record(name):
        def fn(x, hook):
            seen[name] = x.detach().clone()
        return fn

    frozen = [(f"blocks.{l}.attn.hook_z", freeze(l)) for l in range(L)]
    if receivers == "logits":
        return metric(model.run_with_hooks(cs.clean_tokens, fwd_hooks=frozen))
    names = {f"blocks.{l}.attn.hook_{c}" for l, h, c in receivers}
    model.run_with_hooks(cs.clean_tokens, fwd_hooks=frozen + [(n, record(n)) for n in names])

    def put(name, heads):
        def fn(x, hook):
            x = x.clone()
            for h in heads:
                if last_only:
                    for b in range(x.shape[0]):
                        p = int(cs.last_pos[b])
                        x[b, p, h] = seen[name][b, p, h]
                else:
                    x[:, :, h] = seen[name][:, :, h]
            return x
        return fn

    patches = [(n, put(n, [h for l, h, c in receivers if f"blocks.{l}.attn.hook_{c}" == n])) for n in names]
    return metric(model.run_with_hooks(cs.clean_tokens, fwd_hooks=patches))
