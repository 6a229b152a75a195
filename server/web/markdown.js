// Markdown for answers and passages, built as DOM nodes and never as an HTML string, so nothing a model or a
// document writes can become markup: "<img onerror=...>" in a passage is shown as text. Written here instead of
// vendoring marked + DOMPurify: the page loads nothing from elsewhere and has no build step, and the subset chat
// answers use (paragraphs, headings, lists, quotes, code, emphasis, http(s) links) is small; a sanitiser would
// still be needed after any HTML-producing renderer.
//
// Every run of text keeps its offsets in the source: renderMarkdown calls onText(parent, start, end) to append
// source.slice(start, end), so the caller can decorate by position (citation markers, attributed sentences,
// a highlighted sentence) across the formatting.
"use strict";

const MD_FENCE = /^\s{0,3}(```|~~~)/;
const MD_HEADING = /^\s{0,3}(#{1,6})\s+/;
const MD_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+/;
const MD_QUOTE = /^\s{0,3}>\s?/;
// One alternative per inline form, tried leftmost first: code, strong (** or __), emphasis (* or _), link.
const MD_INLINE = new RegExp([
  "(`[^`\\n]+`)",
  "(\\*\\*(?=\\S)[^\\n]*?\\S\\*\\*|__(?=\\S)[^\\n]*?\\S__(?!\\w))",
  "(\\*(?=[^\\s*])[^*\\n]*?[^\\s*]\\*|\\*[^\\s*]\\*|(?<!\\w)_(?=[^\\s_])[^_\\n]*?[^\\s_]_(?!\\w))",
  "(\\[[^\\]\\n]+\\]\\(https?:\\/\\/[^\\s)]+\\))",
].join("|"), "g");

function plainText(parent, source, start, end) {
  parent.append(source.slice(start, end));
}

function renderMarkdown(parent, source, onText = (node, start, end) => plainText(node, source, start, end)) {
  const lines = [];
  for (let start = 0; start <= source.length;) {
    const newline = source.indexOf("\n", start);
    const end = newline < 0 ? source.length : newline;
    lines.push({ start, end, text: source.slice(start, end) });
    start = end + 1;
  }
  let paragraph = null; // {node, start, end}: consecutive text lines, rendered as one range (newlines kept)
  let list = null; // {node, ordered, item}
  const flush = () => {
    if (paragraph) renderInline(paragraph.node, source, paragraph.start, paragraph.end, onText);
    paragraph = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (!line.text.trim()) { flush(); list = null; continue; }
    const fence = line.text.match(MD_FENCE);
    if (fence) {
      flush(); list = null;
      const body = [];
      for (i++; i < lines.length && !lines[i].text.trim().startsWith(fence[1]); i++) body.push(lines[i].text);
      const code = document.createElement("code");
      code.textContent = body.join("\n");
      const pre = document.createElement("pre");
      pre.append(code);
      parent.append(pre);
      continue;
    }
    const heading = line.text.match(MD_HEADING);
    if (heading) {
      flush(); list = null;
      const node = document.createElement("p");
      node.className = `md-heading md-h${heading[1].length}`;
      parent.append(node);
      renderInline(node, source, line.start + heading[0].length, line.end, onText);
      continue;
    }
    const item = line.text.match(MD_ITEM);
    if (item) {
      flush();
      const ordered = /\d/.test(item[2]);
      if (!list || list.ordered !== ordered) {
        list = { node: document.createElement(ordered ? "ol" : "ul"), ordered };
        if (ordered && parseInt(item[2], 10) !== 1) list.node.start = parseInt(item[2], 10);
        parent.append(list.node);
      }
      const li = document.createElement("li");
      list.node.append(li);
      paragraph = { node: li, start: line.start + item[0].length, end: line.end };
      continue;
    }
    const quote = line.text.match(MD_QUOTE);
    if (quote) {
      flush(); list = null;
      const node = document.createElement("blockquote");
      parent.append(node);
      paragraph = { node, start: line.start + quote[0].length, end: line.end };
      continue;
    }
    if (paragraph) { paragraph.end = line.end; continue; } // a continuation line of a paragraph or list item
    list = null;
    const node = document.createElement("p");
    parent.append(node);
    paragraph = { node, start: line.start, end: line.end };
  }
  flush();
}

function renderInline(parent, source, start, end, onText) {
  const text = source.slice(start, end);
  let last = 0;
  for (const match of text.matchAll(MD_INLINE)) {
    const at = match.index;
    const [whole, code, strong, emphasis, link] = match;
    if (at > last) onText(parent, start + last, start + at);
    if (code) {
      const node = document.createElement("code");
      node.textContent = code.slice(1, -1);
      parent.append(node);
    } else if (strong || emphasis) {
      const node = document.createElement(strong ? "strong" : "em");
      const marker = strong ? 2 : 1;
      parent.append(node);
      renderInline(node, source, start + at + marker, start + at + whole.length - marker, onText);
    } else if (link) {
      const split = link.indexOf("](");
      const node = document.createElement("a");
      node.href = link.slice(split + 2, -1); // http(s) only: the pattern admits no other scheme
      node.rel = "noopener noreferrer nofollow";
      node.target = "_blank";
      parent.append(node);
      renderInline(node, source, start + at + 1, start + at + split, onText);
    }
    last = at + whole.length;
  }
  if (last < text.length) onText(parent, start + last, end);
}
