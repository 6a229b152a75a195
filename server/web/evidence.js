// Where in a cited passage the answer's sentence comes from, so the source panel marks that sentence and not the
// whole chunk. The server says which passages support each answer sentence (attribution.sentences, citations[]
// .sentences) but not where inside the passage; the sentence sharing the most content words with the answer's
// sentence is that place, and finding it here keeps the API as it is.
"use strict";

const EVIDENCE_STOPWORDS = new Set(("a an and are as at be by for from has have in is it its of on or that the "
  + "this to was were will with which what when who how do does not no yes than then there their they you your")
  .split(" "));

function contentWords(text) {
  const words = String(text).toLowerCase().match(/[\p{L}\p{N}][\p{L}\p{N}.,/%-]*[\p{L}\p{N}%]|[\p{L}\p{N}]/gu) || [];
  return new Set(words.filter((word) => !EVIDENCE_STOPWORDS.has(word)));
}

// [start, end) of each sentence of ``text``: ends at . ! ? before a space or the end (so "0.1 mg/L" stays whole),
// or at a blank line.
function sentenceSpans(text) {
  const spans = [];
  for (const match of text.matchAll(/\S[\s\S]*?(?:[.!?](?=\s|$)|(?=\n\s*\n)|$)/g)) {
    if (match[0].trim()) spans.push([match.index, match.index + match[0].length]);
  }
  return spans;
}

// The spans of ``text`` that best match each of ``claims`` (answer sentences), merged and in order; empty when
// none shares at least two content words (or all of a short claim's).
function evidenceSpans(text, claims) {
  const sentences = sentenceSpans(text).map(([start, end]) => ({ start, end, words: contentWords(text.slice(start, end)) }));
  const found = new Map();
  for (const claim of claims) {
    const wanted = contentWords(claim.replace(/\[[\d\s,\-\u2013]+\]/g, ""));
    if (!wanted.size) continue;
    let best = null;
    let bestShared = 0;
    for (const sentence of sentences) {
      let shared = 0;
      for (const word of wanted) if (sentence.words.has(word)) shared++;
      if (shared > bestShared) { best = sentence; bestShared = shared; }
    }
    if (best && bestShared >= Math.min(2, wanted.size)) found.set(best.start, [best.start, best.end]);
  }
  return [...found.values()].sort((a, b) => a[0] - b[0]);
}
