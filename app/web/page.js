() => {
  // Page-wide wiring that no single component owns.
  // A phrase in the answer and its box are one thing: hovering one lights the other, clicking selects.
  // (The chat's sanitizer keeps classes but not data-* attributes: a phrase's box number is its class.)
  const markOf = (e) => e.target.closest && e.target.closest('#chat mark.vl2-ref');
  const numberOf = (mark) => Number((/vl2-box-(\d+)/.exec(mark.className) || [])[1]);
  document.addEventListener('pointerover', (e) => {
    const mark = markOf(e);
    if (mark && window.vl2Canvas) window.vl2Canvas.hover(numberOf(mark), e);
  });
  document.addEventListener('pointerout', (e) => {
    if (markOf(e) && window.vl2Canvas) window.vl2Canvas.hover(null);
  });
  document.addEventListener('click', (e) => {
    const mark = markOf(e);
    if (mark && window.vl2Canvas) window.vl2Canvas.select(numberOf(mark));
  });
  // On a phone the canvas and the prompt come first: the box panel starts folded (once, when it appears).
  if (window.matchMedia('(max-width: 720px)').matches) {
    const fold = () => {
      const toggle = document.querySelector('#boxes-section button.label-wrap');
      if (!toggle) return false;
      if (toggle.classList.contains('open')) toggle.click();
      return true;
    };
    if (!fold()) {
      const watcher = new MutationObserver(() => fold() && watcher.disconnect());
      watcher.observe(document.body, { childList: true, subtree: true });
    }
  }
}
