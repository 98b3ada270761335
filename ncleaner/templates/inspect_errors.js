// Runs first: any script error or blocked content is written onto the page itself, where a
// test (or a curious user) can read it without a debugger.
(function () {
  var root = document.documentElement;
  function note(attribute, text) {
    root.setAttribute(attribute, (root.getAttribute(attribute) || "") + text + "\n");
  }
  window.addEventListener("error", function (e) {
    note("data-js-errors", e.message || "error");
  });
  window.addEventListener("unhandledrejection", function (e) {
    note("data-js-errors", "unhandled rejection: " + (e.reason && e.reason.message ? e.reason.message : e.reason));
  });
  // Content the policy blocked: only markup that escaped escaping (or a change that added
  // something from the web) can cause one.
  document.addEventListener("securitypolicyviolation", function (e) {
    note("data-csp-violations", e.violatedDirective + " " + (e.blockedURI || "inline"));
  });
})();
