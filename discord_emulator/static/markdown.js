// Discord's markdown, minimally: code blocks and inline code, bold, italic, underline, strike-through, headings,
// quotes, links, mentions (<@id>, <@&id>, <#id>) and timestamps (<t:unix:style>). Text is escaped first, so nothing
// a message holds becomes markup of its own.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
const STEPS = [
  ["year", 31536000], ["month", 2592000], ["week", 604800], ["day", 86400],
  ["hour", 3600], ["minute", 60], ["second", 1],
];

export function relativeTime(date) {
  const seconds = (date.getTime() - Date.now()) / 1000;
  for (const [unit, size] of STEPS) {
    if (Math.abs(seconds) >= size || unit === "second") {
      return relative.format(Math.round(seconds / size), unit);
    }
  }
  return "";
}

function timestamp(unix, style) {
  const date = new Date(Number(unix) * 1000);
  const formats = {
    t: { timeStyle: "short" }, T: { timeStyle: "medium" }, d: { dateStyle: "short" }, D: { dateStyle: "long" },
    f: { dateStyle: "long", timeStyle: "short" }, F: { dateStyle: "full", timeStyle: "short" },
  };
  const text = style === "R" ? relativeTime(date) : date.toLocaleString(undefined, formats[style] || formats.f);
  return `<time class="timestamp" datetime="${date.toISOString()}" title="${escapeHtml(date.toLocaleString())}">${escapeHtml(text)}</time>`;
}

// `names` answers mentions: { user(id), role(id), channel(id) } -> a display name or null.
export function renderMarkdown(text, names) {
  const kept = [];
  const keep = (html) => `\u0000${kept.push(html) - 1}\u0000`;
  let s = String(text);
  // A fence still being streamed has no closing ``` yet: it runs to the end.
  s = s.replace(/```(?:([\w+#.-]*)\n)?([\s\S]*?)(?:```|$(?![\s\S]))/g, (_, lang, code) =>
    keep(`<pre class="code-block"${lang ? ` data-lang="${escapeHtml(lang)}"` : ""}><code>${escapeHtml(code.replace(/\n$/, ""))}</code></pre>`));
  // Backslash escapes before inline code: discord.py's escape_markdown turns ` into \`.
  s = s.replace(/\\([\\*_`~|>#\-[\]()<@:])/g, (_, c) => keep(escapeHtml(c)));
  s = s.replace(/`([^`\n]+)`/g, (_, code) => keep(`<code class="inline">${escapeHtml(code)}</code>`));
  s = s.replace(/<@!?(\d+)>/g, (m, id) => {
    const name = names.user(id);
    return keep(`<span class="mention" data-user="${id}">@${escapeHtml(name ?? "unknown-user")}</span>`);
  });
  s = s.replace(/<@&(\d+)>/g, (m, id) => keep(`<span class="mention role">@${escapeHtml(names.role(id) ?? "deleted-role")}</span>`));
  s = s.replace(/<#(\d+)>/g, (m, id) => {
    const name = names.channel(id);
    return keep(`<a class="mention channel-link" data-channel="${id}" href="#${id}">#${escapeHtml(name ?? "unknown")}</a>`);
  });
  s = s.replace(/<t:(-?\d+)(?::([tTdDfFR]))?>/g, (_, unix, style) => keep(timestamp(unix, style || "f")));
  s = escapeHtml(s);
  s = s.replace(/\bhttps?:\/\/[^\s<]+[^\s<.,;:!?)'"]/g, (url) => keep(`<a href="${url}" target="_blank" rel="noreferrer noopener">${url}</a>`));
  s = s.replace(/\*\*([\s\S]+?)\*\*/g, "<strong>$1</strong>");
  s = s.replace(/__([\s\S]+?)__/g, "<u>$1</u>");
  s = s.replace(/~~([\s\S]+?)~~/g, "<s>$1</s>");
  s = s.replace(/(^|[^\w*])\*(?!\s)([^*\n]+?)\*(?!\w)/g, "$1<em>$2</em>");
  s = s.replace(/(^|[^\w])_(?!\s)([^_\n]+?)_(?!\w)/g, "$1<em>$2</em>");
  s = s
    .split("\n")
    .map((line) => {
      const heading = /^(#{1,3}) (.*)$/.exec(line);
      if (heading) return `<h${heading[1].length + 2} class="md-heading">${heading[2]}</h${heading[1].length + 2}>`;
      if (line.startsWith("-# ")) return `<small class="subtext">${line.slice(3)}</small>`;
      if (line.startsWith("&gt; ")) return `<blockquote>${line.slice(5)}</blockquote>`;
      return line + "<br>";
    })
    .join("")
    .replace(/<br>$/, "");
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => kept[Number(i)]);
}

// A short plain line of a message, for reply previews.
export function plainPreview(text, names, limit = 90) {
  const plain = String(text)
    .replace(/<@!?(\d+)>/g, (m, id) => `@${names.user(id) ?? "unknown-user"}`)
    .replace(/<#(\d+)>/g, (m, id) => `#${names.channel(id) ?? "unknown"}`)
    .replace(/```[\s\S]*?(```|$)/g, "[code]")
    .replace(/[*_~`]/g, "")
    .replace(/\s+/g, " ")
    .trim();
  return plain.length > limit ? plain.slice(0, limit - 1) + "…" : plain;
}
