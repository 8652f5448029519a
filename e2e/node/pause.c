/* The sandbox ("pause") process of the real node's pods: it holds the pod's namespaces, reaps the
 * zombies of a shared PID namespace, and exits on SIGINT or SIGTERM. Built statically by
 * e2e/node/images.sh into the node's sandbox image, since no registry can be reached here. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction q = {.sa_handler = quit}, r = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
  if (sigaction(SIGINT, &q, NULL) < 0 || sigaction(SIGTERM, &q, NULL) < 0 || sigaction(SIGCHLD, &r, NULL) < 0)
    return 1;
  for (;;) pause();
}
