"""Word tokenisation and singularisation as CHAIR's ``chair.py`` does them, without downloads.

Rohrbach et al.'s ``utils/chair.py`` lowercases a caption, splits it with ``nltk.word_tokenize``
and maps every token through ``pattern.en.singularize``. Neither can run here as shipped:
``word_tokenize`` needs the downloaded Punkt sentence model, and ``pattern`` does not install on
current Pythons. This module re-implements both behaviours from their documented rules:

* :func:`word_tokenize` — Penn-Treebank conventions as ``nltk.word_tokenize`` applies them:
  sentences are split first (Punkt), so a period ending any sentence becomes its own token while
  periods inside a token stay ("u.s." and "3.5" survive); commas/colons split except inside
  numbers; ``; @ # $ % & ? ! *``, brackets, ``--``, ``...`` and quotes are separated; clitics
  (``'s 'm 'd 'll 're 've n't`` and a bare ``'``) split off the word before them; "cannot",
  "gonna", "gotta", "wanna", "gimme", "lemme" split in two. Hyphens and slashes never split
  ("hot-dog" stays one token, so it is *not* the object "hot dog"). The sentence splitter is a
  rule (a period, "?" or "!" followed by white space ends a sentence) instead of the trained Punkt
  model; they differ only after abbreviations such as "dr." or "etc.", which are never COCO words.
* :func:`singularize` — pattern.en's rule-based singulariser, quirks included, because CHAIR's
  numbers depend on them: it is applied to *every* token, singular or not, so "glass" becomes
  "glas" (hence chair.py's special case "wine glas" → "wine glass"), "bus" becomes "bu" (a singular
  "bus" is never counted as the COCO object bus; "buses" → "bus" is), "ties" becomes "ty", and
  "people" becomes "person". The test suite checks this implementation against pattern's output
  on every COCO synonym, its plurals, and the words of real model captions.
"""

from __future__ import annotations

import re

# --- tokenisation ------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])([\]\)}>\"'»”’]*)\s+")

# Applied in order to one sentence (each pads the separated piece with spaces).
_OPEN_QUOTES = [
    (re.compile(r"([«“‘„]|`+)"), r" \1 "),
    (re.compile(r'^"'), "``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ (\[{<])(\"|'{2})"), r"\1 `` "),
    # an opening single quote before a word that is not a clitic ('re, 've, ...)
    (re.compile(r"(?i)(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),
]
_FINAL_PERIOD = re.compile(r"([^.])(\.)([\]\)}>\"'»”’]*)\s*$")
_PUNCT = [
    (_FINAL_PERIOD, r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),        # comma/colon, except inside numbers
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),               # ellipsis
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"[\u2012-\u2015]"), r" \g<0> "),      # figure/en/em dashes
    (_FINAL_PERIOD, r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),               # closing single quote
    (re.compile(r"[*]"), r" \g<0> "),
    (re.compile(r"[\]\[(){}<>]"), r" \g<0> "),         # brackets
    (re.compile(r"--"), r" -- "),
]
_CLOSE_QUOTES = [
    (re.compile(r"([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_SPLIT_WORDS = [re.compile(p) for p in (
    r"(?i)\b(can)(not)\b", r"(?i)\b(d)('ye)\b", r"(?i)\b(gim)(me)\b", r"(?i)\b(gon)(na)\b",
    r"(?i)\b(got)(ta)\b", r"(?i)\b(lem)(me)\b", r"(?i)\b(more)('n)\b", r"(?i)\b(wan)(na)(?=\s)",
    r"(?i) ('t)(is)\b", r"(?i) ('t)(was)\b",
)]


_NUMBER_OR_INITIAL = re.compile(r"(?:^|\s)(?:\d[\d.,:/-]*|[^\W\d])\.$")


def sentences(text: str) -> list[str]:
    """Split ``text`` after ``.``, ``?`` or ``!`` (and any closing quote/bracket) followed by space.

    As Punkt does for lowercase text, a number or a single letter followed by a period ("1.",
    "10:15.", "b.") does not end a sentence when the next word starts in lowercase.
    """
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if (not m.group(1) and _NUMBER_OR_INITIAL.search(text, 0, m.start())
                and m.end() < len(text) and text[m.end()].islower()):
            continue
        out.append(text[start:m.end(1)])
        start = m.end()
    out.append(text[start:])
    return [s for s in out if s.strip()]


def _tokenize_sentence(s: str) -> list[str]:
    for rx, sub in _OPEN_QUOTES:
        s = rx.sub(sub, s)
    for rx, sub in _PUNCT:
        s = rx.sub(sub, s)
    s = f" {s} "
    for rx, sub in _CLOSE_QUOTES:
        s = rx.sub(sub, s)
    for rx in _SPLIT_WORDS:
        s = rx.sub(r" \1 \2 ", s)
    return s.split()


def word_tokenize(text: str) -> list[str]:
    """Tokens of ``text`` as ``nltk.word_tokenize`` (Treebank conventions, sentence by sentence).

    >>> word_tokenize("two hot dogs, and a dog's bowl. a man.")
    ['two', 'hot', 'dogs', ',', 'and', 'a', 'dog', "'s", 'bowl', '.', 'a', 'man', '.']
    """
    return [t for s in sentences(text) for t in _tokenize_sentence(s)]


# --- singularisation ---------------------------------------------------------------------------
# pattern.en's singularize (CLiPS, BSD licence; version 3.6, the one chair.py's requirements.txt
# pins), re-implemented as tables. Order matters: the first table that matches decides. The
# "invariant" words are tested with ``w`` being a *suffix* of a listed word (pattern's test), so
# e.g. "ice" (in "rice") and "and" (in "sand") stay as they are.

_INVARIANT = frozenset((
    # uninflected
    "bison", "debris", "headquarters", "pincers", "trout", "bream", "diabetes", "herpes", "pliers",
    "tuna", "breeches", "djinn", "high-jinks", "proceedings", "whiting", "britches", "eland",
    "homework", "rabies", "wildebeest", "carp", "elk", "innings", "salmon", "chassis", "flounder",
    "jackanapes", "scissors", "christmas", "gallows", "mackerel", "series", "clippers", "georgia",
    "measles", "shears", "cod", "graffiti", "mews", "species", "contretemps", "mumps", "swine",
    "corps", "news", "swiss",
    # uncountable
    "advice", "equipment", "happiness", "luggage", "software", "bread", "fruit", "information",
    "mathematics", "progress", "understanding", "butter", "furniture", "ketchup", "mayonnaise",
    "research", "water", "cheese", "garbage", "knowledge", "meat", "rice", "electricity", "gravel",
    "love", "mustard", "sand",
))
# Words in -ie whose plural is -ies: pattern 3.6 returns such plurals *unchanged* ("doggies"
# stays "doggies", so it is not the COCO synonym "doggie"). The two entries pattern writes with a
# "^" anchor ("^pie", "^tie") never match its plain-text test, so "ties" -> "ty"; omitted here.
_IE_WORDS = (
    "alergie", "cutie", "hoagie", "newbie", "softie", "veggie", "auntie", "doggie", "hottie",
    "nightie", "sortie", "weenie", "beanie", "eyrie", "indie", "oldie", "stoolie", "yuppie", "birdie",
    "freebie", "junkie", "sweetie", "zombie", "bogie", "goonie", "laddie", "pixie", "techie", "bombie",
    "groupie", "laramie", "quickie", "collie", "hankie", "lingerie", "reverie", "toughie", "cookie",
    "hippie", "meanie", "rookie", "valkyrie",
)
_IRREGULAR = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef", "brethren": "brother",
    "children": "child", "corpora": "corpus", "corpuses": "corpus", "ephemerides": "ephemeris",
    "feet": "foot", "ganglia": "ganglion", "geese": "goose", "genera": "genus", "genii": "genie",
    "graffiti": "graffito", "helves": "helve", "kine": "cow", "leaves": "leaf", "loaves": "loaf",
    "men": "man", "mongooses": "mongoose", "monies": "money", "moves": "move", "mythoi": "mythos",
    "numena": "numen", "occipita": "occiput", "octopodes": "octopus", "opera": "opus", "opuses": "opus",
    "our": "my", "oxen": "ox", "penes": "penis", "penises": "penis", "people": "person", "sexes": "sex",
    "soliloquies": "soliloquy", "teeth": "tooth", "testes": "testis", "trilbys": "trilby",
    "turves": "turf", "zoa": "zoon",
}
# (suffix pattern, replacement) tried in order; the first that matches is applied.
_SUFFIX_RULES = [(re.compile(p, re.I), r) for p, r in (
    (r"(.)ae$", r"\1a"), (r"(.)itis$", r"\1itis"), (r"(.)eaux$", r"\1eau"), (r"(quiz)zes$", r"\1"),
    (r"(matr)ices$", r"\1ix"), (r"(ap|vert|ind)ices$", r"\1ex"), (r"^(ox)en", r"\1"),
    (r"(alias|status)es$", r"\1"),
    (r"([octop|vir])i$", r"\1us"),          # a character class in pattern: any of "octp|vir" + "i"
    (r"(cris|ax|test)es$", r"\1is"), (r"(shoe)s$", r"\1"), (r"(o)es$", r"\1"), (r"(bus)es$", r"\1"),
    (r"([m|l])ice$", r"\1ouse"), (r"(x|ch|ss|sh)es$", r"\1"), (r"(m)ovies$", r"\1ovie"),
    (r"(.)ombies$", r"\1ombie"), (r"(s)eries$", r"\1eries"), (r"([^aeiouy]|qu)ies$", r"\1y"),
    # -f / -fe words with -ves plurals
    (r"([aeo]l)ves$", r"\1f"), (r"([^d]ea)ves$", r"\1f"), (r"arves$", "arf"), (r"erves$", "erve"),
    (r"([nlw]i)ves$", r"\1fe"), (r"([lr])ves$", r"\1f"), (r"([aeo])ves$", r"\1ve"),
    (r"(sive)s$", r"\1"), (r"(tive)s$", r"\1"), (r"(hive)s$", r"\1"), (r"([^f])ves$", r"\1fe"),
    # -ses
    (r"(^analy)ses$", r"\1sis"),
    (r"((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(.)opses$", r"\1opsis"), (r"(.)yses$", r"\1ysis"), (r"(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"), (r"(.)oses$", r"\1osis"),
    # Latin -a
    (r"([ti])a$", r"\1um"), (r"(n)ews$", r"\1ews"),
    (r"s$", ""),
)]
_PREPOSITIONS = frozenset((
    "about", "before", "during", "of", "till", "above", "behind", "except", "off", "to", "across",
    "below", "for", "on", "under", "after", "beneath", "from", "onto", "until", "among", "beside",
    "in", "out", "unto", "around", "besides", "into", "over", "upon", "at", "between", "near",
    "since", "with", "athwart", "betwixt", "beyond", "but", "by",
))


def singularize(word: str) -> str:
    """pattern.en's ``singularize(word)``, the normalisation CHAIR applies to every caption token.

    >>> [singularize(w) for w in ("dogs", "people", "knives", "skis", "glasses", "glass", "bus")]
    ['dog', 'person', 'knife', 'ski', 'glass', 'glas', 'bu']
    """
    if "-" in word:  # compounds like "mothers-in-law"
        parts = word.split("-")
        if len(parts) > 1 and parts[1] in _PREPOSITIONS:
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):  # dogs' -> dog's
        return singularize(word[:-1]) + "'s"
    w = word.lower()
    if any(x.endswith(w) for x in _INVARIANT):
        return word
    if any(w.endswith(x + "s") for x in _IE_WORDS):
        return w  # pattern 3.6 returns the word unchanged here (2.6 returned the -ie form)
    for plural, singular in _IRREGULAR.items():
        if w.endswith(plural):
            return re.sub("(?i)" + plural + "$", singular, word)
    for rx, sub in _SUFFIX_RULES:
        m = rx.search(word)
        if m:
            # pattern drops references to groups that did not take part in the match
            for k, g in enumerate(m.groups(), start=1):
                if g is None:
                    sub = sub.replace("\\" + str(k), "")
            return rx.sub(sub, word)
    return word
