"""The compiled routine: public e_step / m_step / logp on values, and EM, the step-by-
step API over it."""
