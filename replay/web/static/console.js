// The rabbit-archive console's only script: the traffic chart and the copy buttons.
// Archived values (exchange names, coverage lines) are only ever set as text (textContent,
// setAttribute of our own URLs), never parsed as HTML.
"use strict";

(function () {
  var SVG = "http://www.w3.org/2000/svg";
  var WIDTH = 960;
  var HEIGHT = 200;
  var LEFT = 56;
  var RIGHT = 8;
  var TOP = 10;
  var BOTTOM = 26;
  var SERIES_CLASSES = 9;

  function svg(name, attributes, parent) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attributes).forEach(function (key) {
      node.setAttribute(key, String(attributes[key]));
    });
    if (parent) {
      parent.appendChild(node);
    }
    return node;
  }

  function html(name, className, text, parent) {
    var node = document.createElement(name);
    if (className) {
      node.className = className;
    }
    if (text !== null) {
      node.textContent = text;
    }
    if (parent) {
      parent.appendChild(node);
    }
    return node;
  }

  function utc(date) {
    return date.toISOString().replace("T", " ").replace(/\.\d+Z$/, "");
  }

  function span(seconds) {
    if (seconds % 86400 === 0) {
      return seconds / 86400 + " d";
    }
    if (seconds % 3600 === 0) {
      return seconds / 3600 + " h";
    }
    if (seconds % 60 === 0) {
      return seconds / 60 + " min";
    }
    return seconds + " s";
  }

  // The search narrowed to one bar's interval (and exchange, for a segment of one).
  function narrowed(search, since, until, exchange) {
    var params = new URLSearchParams(search);
    ["since", "until", "after", "upto"].forEach(function (name) {
      params.delete(name);
    });
    params.set("since", since.toISOString());
    params.set("until", until.toISOString());
    if (exchange !== null && exchange !== "") {
      params.delete("exchange");
      params.append("exchange", exchange);
    }
    return "/?" + params.toString();
  }

  function draw(box, data) {
    box.textContent = "";
    var start = new Date(data.from);
    var width = data.width;
    var count = data.count;
    data.bars.forEach(function (bar) {
      count = Math.max(count, bar[0] + 1);
    });
    var highest = 1;
    data.bars.forEach(function (bar) {
      highest = Math.max(highest, bar[1].reduce(function (a, b) { return a + b; }, 0));
    });
    var plot = WIDTH - LEFT - RIGHT;
    var step = plot / count;
    var chart = svg("svg", {
      viewBox: "0 0 " + WIDTH + " " + HEIGHT,
      role: "img",
      "aria-label": "messages per " + span(width) + " per exchange",
    }, box);
    var base = HEIGHT - BOTTOM;
    svg("line", { x1: LEFT, y1: base, x2: WIDTH - RIGHT, y2: base, class: "axis" }, chart);
    svg("line", { x1: LEFT, y1: TOP, x2: LEFT, y2: base, class: "axis" }, chart);
    svg("text", { x: LEFT - 6, y: TOP + 9, "text-anchor": "end" }, chart).textContent = highest.toLocaleString("en");
    svg("text", { x: LEFT - 6, y: base, "text-anchor": "end" }, chart).textContent = "0";
    svg("text", { x: LEFT, y: HEIGHT - 8 }, chart).textContent = utc(start) + " UTC";
    var end = new Date(start.getTime() + count * width * 1000);
    svg("text", { x: WIDTH - RIGHT, y: HEIGHT - 8, "text-anchor": "end" }, chart).textContent =
      utc(end) + " UTC · one bar per " + span(width);
    data.bars.forEach(function (bar) {
      var since = new Date(start.getTime() + bar[0] * width * 1000);
      var until = new Date(since.getTime() + width * 1000);
      var x = LEFT + bar[0] * step;
      var y = base;
      bar[1].forEach(function (messages, index) {
        if (messages <= 0) {
          return;
        }
        var series = data.series[index];
        var height = Math.max(1, (messages / highest) * (base - TOP));
        y -= height;
        var link = svg("a", {
          href: narrowed(box.dataset.search, since, until, series.narrows ? series.exchange : null),
          class: "bar",
        }, chart);
        var rect = svg("rect", {
          x: x + 0.5,
          y: y,
          width: Math.max(1, step - 1),
          height: height,
          class: "s" + Math.min(index, SERIES_CLASSES - 1),
        }, link);
        svg("title", {}, rect).textContent =
          utc(since) + " – " + utc(until) + " UTC\n" + series.label + ": " + messages.toLocaleString("en") +
          " messages\n(click to narrow the search)";
      });
    });
    var legend = html("div", "legend", null, box);
    data.series.forEach(function (series, index) {
      var entry = html("span", "entry", null, legend);
      html("span", "swatch s" + Math.min(index, SERIES_CLASSES - 1), null, entry);
      html("span", "label", series.label, entry);
      html("span", "muted", series.total.toLocaleString("en"), entry);
    });
  }

  function showCoverage(box, coverage) {
    if (!box) {
      return;
    }
    box.textContent = "";
    var kind = coverage.complete === true ? "complete" : coverage.complete === false ? "incomplete" : "";
    coverage.lines.forEach(function (line) {
      html("div", kind, line, box);
    });
  }

  function load(box) {
    var counter = document.getElementById("match-count");
    fetch(box.dataset.src, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (response) {
        return response.json().then(function (data) {
          return { ok: response.ok, status: response.status, data: data };
        });
      })
      .then(function (answer) {
        if (!answer.ok) {
          box.textContent = "no chart: " + (answer.data.error || "error " + answer.status);
          return;
        }
        if (counter) {
          counter.textContent = answer.data.total.toLocaleString("en") + " messages match";
        }
        if (answer.data.total === 0) {
          box.textContent = "no message in this window";
        } else {
          draw(box, answer.data);
        }
        showCoverage(document.getElementById("coverage"), answer.data.coverage);
      })
      .catch(function (error) {
        box.textContent = "the chart could not be loaded: " + error;
      });
  }

  function copyButtons() {
    document.querySelectorAll("button[data-copy]").forEach(function (button) {
      button.addEventListener("click", function () {
        var source = document.getElementById(button.dataset.copy);
        if (!source || !navigator.clipboard) {
          return;
        }
        navigator.clipboard.writeText(source.textContent).then(function () {
          button.textContent = "Copied";
        });
      });
    });
  }

  var chart = document.getElementById("traffic");
  if (chart && chart.dataset.src) {
    load(chart);
  }
  copyButtons();
})();
