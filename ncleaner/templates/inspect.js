// The page's only behaviour: text filter, sorting, selection with "copy keys", and the
// enlarged image. It reads captions only through textContent and writes text only through
// textContent / value, so no caption is ever parsed as markup.
(function () {
  "use strict";
  var root = document.documentElement;
  var cards = Array.prototype.slice.call(document.querySelectorAll("article.card"));
  var q = document.getElementById("q");
  var sort = document.getElementById("sort");
  var keys = document.getElementById("keys");
  var picked = document.getElementById("picked");
  var copyNote = document.getElementById("copy-note");
  var lightbox = document.getElementById("lightbox");
  var big = lightbox.querySelector(".big");
  var bigCaption = lightbox.querySelector(".caption");

  var searchText = new Map();
  cards.forEach(function (card) {
    var parts = [".key", ".shard", ".caption", ".outcome"].map(function (sel) {
      var el = card.querySelector(sel);
      return el ? el.textContent : "";
    });
    parts.push(card.querySelector(".shard").getAttribute("title") || "");
    searchText.set(card, parts.join("\n").toLowerCase());
  });

  function hashParams() {
    return new URLSearchParams(window.location.hash.replace(/^#/, ""));
  }

  function writeHash() {
    var p = new URLSearchParams();
    if (q.value) p.set("q", q.value);
    if (sort.value !== "order") p.set("sort", sort.value);
    if (!isNaN(cut)) p.set("cut", String(cut));
    var text = p.toString();
    try {
      history.replaceState(null, "", text ? "#" + text : window.location.pathname + window.location.search);
    } catch (e) {
      // Some browsers refuse history changes on file: pages; the filter works all the same.
    }
  }

  function applyFilter() {
    var needle = q.value.trim().toLowerCase();
    var shown = 0;
    cards.forEach(function (card) {
      var hide = needle !== "" && searchText.get(card).indexOf(needle) < 0;
      card.hidden = hide;
      if (!hide) shown += 1;
    });
    document.querySelectorAll("section.gallery").forEach(function (gallery) {
      var all = gallery.querySelectorAll("article.card");
      var visible = gallery.querySelectorAll("article.card:not([hidden])");
      gallery.querySelector(".count").textContent =
        all.length === visible.length ? String(all.length) : visible.length + " of " + all.length;
    });
    root.setAttribute("data-shown", String(shown));
  }

  function sortValue(card, column) {
    var v = card.getAttribute("data-v-" + column);
    return v === null || v === "" ? NaN : parseFloat(v);
  }

  function applySort() {
    var how = sort.value.split(":");
    document.querySelectorAll("section.gallery .cards").forEach(function (box) {
      var list = Array.prototype.slice.call(box.children);
      list.sort(function (a, b) {
        if (how[0] === "order") return a.getAttribute("data-order") - b.getAttribute("data-order");
        if (how[0] === "key") return a.getAttribute("data-key") < b.getAttribute("data-key") ? -1 : 1;
        var x = sortValue(a, how[0]);
        var y = sortValue(b, how[0]);
        if (isNaN(x) || isNaN(y)) return isNaN(x) - isNaN(y); // unscored cards last either way
        return how[1] === "desc" ? y - x : x - y;
      });
      list.forEach(function (card) {
        box.appendChild(card);
      });
    });
  }

  function selectedKeys() {
    var seen = new Set();
    var out = [];
    cards.forEach(function (card) {
      var copy = card.getAttribute("data-copy");
      if (card.querySelector("input.sel").checked && !seen.has(copy)) {
        seen.add(copy);
        out.push(copy);
      }
    });
    return out;
  }

  function updateKeys() {
    var list = selectedKeys();
    var text = list.length ? list.join("\n") + "\n" : "";
    keys.textContent = text; // the default value too, so a saved or dumped page keeps it
    keys.value = text;
    picked.textContent = list.length + " selected";
    root.setAttribute("data-selected", String(list.length));
  }

  function setPicked(card, on) {
    // The same pair may sit in two galleries: its cards are one selection.
    var row = card.getAttribute("data-row");
    cards.forEach(function (other) {
      if (other.getAttribute("data-row") === row) other.querySelector("input.sel").checked = on;
    });
  }

  cards.forEach(function (card) {
    card.querySelector("input.sel").addEventListener("change", function (e) {
      setPicked(card, e.target.checked);
      updateKeys();
    });
    var thumb = card.querySelector(".thumb");
    thumb.addEventListener("click", function () {
      openLightbox(card);
    });
    thumb.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        openLightbox(card);
      }
    });
  });

  function selectShown() {
    cards.forEach(function (card) {
      if (!card.hidden) setPicked(card, true);
    });
    updateKeys();
  }

  function openLightbox(card) {
    var thumb = card.querySelector(".thumb");
    var cls = thumb.getAttribute("data-thumb");
    if (!cls) return;
    big.className = "big " + cls;
    bigCaption.textContent = card.querySelector(".key").textContent + ": " + card.querySelector(".caption").textContent;
    lightbox.hidden = false;
  }

  lightbox.addEventListener("click", function () {
    lightbox.hidden = true;
  });
  document.addEventListener("keydown", function (e) {
    if (e.key === "Escape") lightbox.hidden = true;
  });

  document.getElementById("select-shown").addEventListener("click", selectShown);
  document.getElementById("select-none").addEventListener("click", function () {
    cards.forEach(function (card) {
      card.querySelector("input.sel").checked = false;
    });
    updateKeys();
  });
  document.getElementById("copy").addEventListener("click", function () {
    var text = keys.value;
    if (!text) {
      copyNote.textContent = "select cards first";
      return;
    }
    function fallback() {
      keys.focus();
      keys.select();
      var ok = false;
      try {
        ok = document.execCommand("copy");
      } catch (e) {
        ok = false;
      }
      copyNote.textContent = ok ? "copied" : "press Ctrl+C / Cmd+C to copy the selected text";
    }
    if (navigator.clipboard && navigator.clipboard.writeText) {
      navigator.clipboard.writeText(text).then(function () {
        copyNote.textContent = "copied " + selectedKeys().length + " key(s)";
      }, fallback);
    } else {
      fallback();
    }
  });

  q.addEventListener("input", function () {
    applyFilter();
    writeHash();
  });
  sort.addEventListener("change", function () {
    applySort();
    writeHash();
  });

  // The cut slider: what a threshold on the shown column keeps, from the page's own sorted values
  // (every value of a small pool, quantiles of a large one), and the filter command for it.
  var slider = document.getElementById("slider");
  var cutInput = document.getElementById("cut");
  var cut = NaN;
  function countAtLeast(sorted, t) {
    var lo = 0;
    var hi = sorted.length;
    while (lo < hi) {
      var mid = (lo + hi) >> 1;
      if (sorted[mid] < t) lo = mid + 1;
      else hi = mid;
    }
    return sorted.length - lo;
  }
  function scaled(count, sampled, total) {
    return sampled === total || sampled === 0 ? count : Math.round((count * total) / sampled);
  }
  function showCut(t) {
    if (!slider) return;
    cut = t;
    var values = JSON.parse(slider.getAttribute("data-values"));
    var keysAt = JSON.parse(slider.getAttribute("data-keys"));
    var noisyValues = JSON.parse(slider.getAttribute("data-noisy-values"));
    var n = Number(slider.getAttribute("data-n"));
    var noisyN = Number(slider.getAttribute("data-noisy-n"));
    var noisyTotal = Number(slider.getAttribute("data-noisy-total"));
    var about = slider.getAttribute("data-exact") === "1" ? "" : "about ";
    var kept = scaled(countAtLeast(values, t), values.length, n);
    document.getElementById("cut-value").textContent =
      slider.getAttribute("data-column") + " >= " + (cut.toPrecision(6) * 1).toString();
    var line = about + kept + " of " + n + " pairs kept (" + (n ? ((100 * kept) / n).toFixed(1) : "0.0") + "%), " +
      (n - kept) + " rejected";
    if (noisyTotal) {
      var keptNoisy = scaled(countAtLeast(noisyValues, t), noisyValues.length, noisyN);
      line += "; kept set " + (kept ? (100 * (1 - keptNoisy / kept)).toFixed(1) : "-") + "% clean, " +
        ((100 * (1 - keptNoisy / noisyTotal)).toFixed(1)) + "% of the noise removed";
    }
    document.getElementById("cut-counts").textContent = line;
    var first = values.length - countAtLeast(values, t);
    var near = [];
    for (var i = Math.max(0, first - 3); i < Math.min(values.length, first + 3); i++) {
      near.push(keysAt[i] + " (" + values[i].toPrecision(6) * 1 + (i < first ? ", rejected" : ", kept") + ")");
    }
    document.getElementById("cut-nearest").textContent = near.length ? "nearest the cut: " + near.join(", ") : "";
    // The threshold exactly as counted (the shortest text that reads back as it), so that filter
    // keeps the very pairs counted here.
    document.getElementById("cut-command").value = slider.getAttribute("data-command").replace("THRESHOLD", String(t));
    root.setAttribute("data-cut-kept", String(kept));
    root.setAttribute("data-cut-command", document.getElementById("cut-command").value);
  }
  if (slider) {
    cutInput.addEventListener("input", function () {
      showCut(parseFloat(cutInput.value));
      writeHash();
    });
    document.getElementById("copy-command").addEventListener("click", function () {
      var box = document.getElementById("cut-command");
      var note = document.getElementById("command-note");
      if (navigator.clipboard && navigator.clipboard.writeText) {
        navigator.clipboard.writeText(box.value).then(function () {
          note.textContent = "copied";
        }, function () {
          box.select();
          note.textContent = "press Ctrl+C / Cmd+C to copy the selected text";
        });
      } else {
        box.select();
        note.textContent = "press Ctrl+C / Cmd+C to copy the selected text";
      }
    });
  }

  var p = hashParams();
  q.value = p.get("q") || "";
  if (slider) {
    var start = parseFloat(p.get("cut") || slider.getAttribute("data-cut"));
    if (!isNaN(start)) {
      cutInput.value = String(start);
      showCut(start);
    }
  }
  var wanted = p.get("sort");
  if (wanted && Array.prototype.some.call(sort.options, function (o) { return o.value === wanted; })) {
    sort.value = wanted;
  }
  applySort();
  applyFilter();
  if (p.get("select") === "shown") selectShown();
  updateKeys();
  root.setAttribute("data-ready", "1");
})();
