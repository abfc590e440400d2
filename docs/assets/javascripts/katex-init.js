// Typesets the formulas pymdownx.arithmatex (generic mode) leaves as \( ... \) and \[ ... \] in
// elements of class "arithmatex", with the KaTeX files vendored under assets/vendor/katex (no CDN:
// the site renders offline). Material's document$ fires on every page load (instant navigation too).
(function () {
  function typeset(root) {
    var options = {
      delimiters: [
        { left: "\\[", right: "\\]", display: true },
        { left: "\\(", right: "\\)", display: false },
      ],
      throwOnError: false,
    };
    root.querySelectorAll(".arithmatex").forEach(function (element) {
      renderMathInElement(element, options);
    });
  }
  if (typeof document$ !== "undefined") {
    document$.subscribe(function () { typeset(document); });
  } else {
    document.addEventListener("DOMContentLoaded", function () { typeset(document); });
  }
})();
