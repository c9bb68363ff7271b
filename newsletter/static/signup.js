// The signup form's proof of work (newsletter/proof_of_work.py): find a number N such that
// sha256("TICKET:N") starts with data-pow-bits zero bits, put it in the form's "pow" field, and
// send the form no sooner than data-min-seconds after it was shown. Served by the app itself
// (CSP script-src 'self'); without it the form still works, after a longer wait.
(function () {
  "use strict";
  var K = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2
  ];
  var W = new Int32Array(64);

  // sha256 of an ASCII string (the ticket is URL-safe base64 and dots; the number is digits).
  function sha256(text) {
    var n = text.length, blocks = ((n + 8) >> 6) + 1, words = new Int32Array(blocks * 16);
    for (var i = 0; i < n; i++) words[i >> 2] |= text.charCodeAt(i) << (24 - (i % 4) * 8);
    words[n >> 2] |= 0x80 << (24 - (n % 4) * 8);
    words[blocks * 16 - 1] = n * 8;
    var h0 = 0x6a09e667, h1 = 0xbb67ae85, h2 = 0x3c6ef372, h3 = 0xa54ff53a;
    var h4 = 0x510e527f, h5 = 0x9b05688c, h6 = 0x1f83d9ab, h7 = 0x5be0cd19;
    for (var b = 0; b < blocks; b++) {
      var a = h0, bb = h1, c = h2, d = h3, e = h4, f = h5, g = h6, h = h7, t;
      for (var j = 0; j < 64; j++) {
        if (j < 16) {
          W[j] = words[b * 16 + j];
        } else {
          var x = W[j - 15], y = W[j - 2];
          var s0 = ((x >>> 7) | (x << 25)) ^ ((x >>> 18) | (x << 14)) ^ (x >>> 3);
          var s1 = ((y >>> 17) | (y << 15)) ^ ((y >>> 19) | (y << 13)) ^ (y >>> 10);
          W[j] = (W[j - 16] + s0 + W[j - 7] + s1) | 0;
        }
        var S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
        var t1 = (h + S1 + ((e & f) ^ (~e & g)) + K[j] + W[j]) | 0;
        var S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
        t = (S0 + ((a & bb) ^ (a & c) ^ (bb & c))) | 0;
        h = g; g = f; f = e; e = (d + t1) | 0; d = c; c = bb; bb = a; a = (t1 + t) | 0;
      }
      h0 = (h0 + a) | 0; h1 = (h1 + bb) | 0; h2 = (h2 + c) | 0; h3 = (h3 + d) | 0;
      h4 = (h4 + e) | 0; h5 = (h5 + f) | 0; h6 = (h6 + g) | 0; h7 = (h7 + h) | 0;
    }
    return [h0, h1];
  }

  function zeroBits(words) {
    var bits = 0;
    for (var i = 0; i < words.length; i++) {
      if (words[i] !== 0) return bits + Math.clz32(words[i]);
      bits += 32;
    }
    return bits;
  }

  var form = document.getElementById("signup");
  if (!form) return;
  var bits = parseInt(form.getAttribute("data-pow-bits"), 10) || 0;
  var wait = (parseInt(form.getAttribute("data-min-seconds"), 10) || 0) * 1000;
  var shown = Date.now();
  var ticket = form.elements.form_token.value;
  var answer = null, wanted = false, counter = 0;

  function send() {
    form.elements.pow.value = answer;
    var left = shown + wait - Date.now();
    if (left > 0) setTimeout(function () { form.submit(); }, left + 50);
    else form.submit();
  }

  // In slices, so the page stays responsive while it works.
  function work() {
    var end = Date.now() + 40;
    while (Date.now() < end) {
      for (var k = 0; k < 500; k++, counter++) {
        if (zeroBits(sha256(ticket + ":" + counter)) >= bits) {
          answer = String(counter);
          if (wanted) send();
          return;
        }
      }
    }
    setTimeout(work, 0);
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (!form.reportValidity || form.reportValidity()) {
      wanted = true;
      var button = form.querySelector("button[type=submit]");
      if (button) button.setAttribute("aria-busy", "true");
      if (answer !== null) send();
    }
  });
  setTimeout(work, 0);
})();
