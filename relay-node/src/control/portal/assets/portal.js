// The management portal's only script (served from the relay; no inline script anywhere).
// Pages work without it: it asks before destructive changes and shows chart values on
// hover and keyboard focus, next to the values each bar carries in its <title>.
'use strict';

document.addEventListener('submit', (event) => {
  const form = event.target;
  const question = form instanceof HTMLFormElement ? form.dataset.confirm : undefined;
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

function setUpChart(figure) {
  const tip = document.createElement('div');
  tip.className = 'tip';
  tip.setAttribute('role', 'status');
  tip.hidden = true;
  figure.appendChild(tip);
  const show = (rect) => {
    const title = rect.querySelector('title');
    tip.textContent = title ? title.textContent : '';
    tip.hidden = false;
  };
  figure.querySelectorAll('rect[data-value]').forEach((rect) => {
    rect.setAttribute('tabindex', '0');
    const title = rect.querySelector('title');
    if (title) {
      rect.setAttribute('aria-label', title.textContent);
    }
    rect.addEventListener('mouseenter', () => show(rect));
    rect.addEventListener('focus', () => show(rect));
    rect.addEventListener('mouseleave', () => { tip.hidden = true; });
    rect.addEventListener('blur', () => { tip.hidden = true; });
  });
}

document.querySelectorAll('figure.chart').forEach(setUpChart);
